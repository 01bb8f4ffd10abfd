"""SageMaker SDK v2 (2.257+): the job through the HuggingFace Estimator. Its support ends on
2027-07-06; sdk_v3.py sends the same request through 3.x.

v2 quirks handled here (each verified against sagemaker 2.257):
- it builds the STS endpoint itself and ignores AWS_ENDPOINT_URL, so it always gets an
  explicit bucket and never looks one up;
- telemetry is opted out through the session's sagemaker_config;
- `debugger_hook_config=False, disable_profiler=True` keep it from adding rules;
- multi-GPU is `distribution={"torch_distributed": {"enabled": True}}` (a `torchrun` key is
  silently ignored);
- `disable_output_compression=True` writes the adapter files as they are, no model.tar.gz;
- source_dir is an s3:// URI that submit uploaded, so the Estimator uploads nothing itself;
- it JSON-encodes every hyperparameter and adds the toolkit's own (`sagemaker_program`,
  `sagemaker_submit_directory`, ...), which sdk_v3.py writes out by hand.
"""

from __future__ import annotations

import os

from launcher.job_spec import (
    PY_VERSION,
    PYTORCH_VERSION,
    TRANSFORMERS_VERSION,
    JobSpec,
    quiet_sdk_logging,
    training_image,
)

os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")


def _session(spec: JobSpec, boto_sess):
    import sagemaker

    return sagemaker.Session(
        boto_session=boto_sess,
        default_bucket=spec.bucket,  # never let v2 derive one through STS
        sagemaker_config={"SchemaVersion": "1.0",
                          "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}},
    )


def known_image_uri(region: str, instance_type: str) -> str:
    """The SDK's URI of the HF image both majors know (job_spec.KNOWN) in `region`; ValueError
    where it is not published."""
    quiet_sdk_logging()  # importing the SDK logs its config lookup to stdout otherwise
    from sagemaker import image_uris

    return image_uris.retrieve("huggingface", region, version=TRANSFORMERS_VERSION, py_version=PY_VERSION,
                               base_framework_version=f"pytorch{PYTORCH_VERSION}", instance_type=instance_type,
                               image_scope="training")


def create_training_job(spec: JobSpec, boto_sess) -> None:
    """CreateTrainingJob through `HuggingFace(...).fit()`, on `boto_sess`'s clients."""
    quiet_sdk_logging()
    from sagemaker.huggingface import HuggingFace

    # py_version even with an own image: the Estimator requires it (without, compute.image_uri
    # failed with a TypeError before anything was sent)
    uri = training_image(spec, lambda: known_image_uri(spec.region, spec.instance_type))
    image = {"image_uri": uri} if uri else {
        "transformers_version": TRANSFORMERS_VERSION, "pytorch_version": PYTORCH_VERSION}
    kwargs = {}
    if spec.max_wait_s is not None:
        kwargs.update(use_spot_instances=True, max_wait=spec.max_wait_s)
    if spec.distributed:
        kwargs["distribution"] = {"torch_distributed": {"enabled": True}}
    estimator = HuggingFace(
        entry_point=spec.entry_script,
        source_dir=spec.source_dir,
        role=spec.role,
        instance_type=spec.instance_type,
        instance_count=spec.instance_count,
        volume_size=spec.volume_size_gb,
        max_run=spec.max_run_s,
        hyperparameters=spec.hyperparameters,
        environment=spec.environment,
        output_path=spec.output_path,
        checkpoint_s3_uri=spec.checkpoint_s3_uri,
        checkpoint_local_path=spec.checkpoint_local_path,
        metric_definitions=spec.metric_definitions,
        tags=spec.tags,
        debugger_hook_config=False,
        disable_profiler=True,
        disable_output_compression=True,
        container_entry_point=spec.container_entry_point,
        sagemaker_session=_session(spec, boto_sess),
        py_version=PY_VERSION,
        **image,
        **kwargs,
    )
    estimator.fit(inputs=spec.inputs or None, job_name=spec.name, wait=False, logs=False)
