"""sagemaker-qlora: fine-tune LLMs with QLoRA on Amazon SageMaker from one YAML file.

    from launcher import launch_job
    job = launch_job("job.yaml")          # or local=True to run on this machine
    for line in job.lines(follow=True):   # parsed log lines, to the job's end
        print(line)
    job.download("adapter/")
"""

__version__ = "0.1.0"

__all__ = ["launch_job", "Job", "load_config", "LauncherError", "ConfigError", "AWSError", "JobFailed", "Interrupted",
           "DiskError"]


def __getattr__(name):  # lazy: `sm-qlora --help` must not import boto3 or the SageMaker SDK
    if name in ("launch_job", "Job"):
        from launcher import job

        return getattr(job, name)
    if name == "load_config":
        from launcher.config import load_config

        return load_config
    if name in ("LauncherError", "ConfigError", "AWSError", "JobFailed", "Interrupted", "DiskError"):
        from launcher import errors

        return getattr(errors, name)
    raise AttributeError(name)
