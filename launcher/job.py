"""`launch_job()` and the `Job` handle: the product's Python API. The CLI is a thin
shell over these."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.config import JobConfig, load_config
from launcher.errors import AWSError, ConfigError, Interrupted, JobFailed

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL = ("Completed", "Failed", "Stopped")


@dataclass
class Job:
    """A training job on SageMaker, or a local run under runs/<name>/."""

    name: str
    region: str | None = None
    profile: str | None = None
    local_dir: Path | None = None
    output_s3_uri: str | None = None
    checkpoint_s3_uri: str | None = None
    request: dict | None = None  # the CreateTrainingJob request of a dry run
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------ where things are
    @property
    def is_local(self) -> bool:
        return self.local_dir is not None

    @property
    def console_url(self) -> str | None:
        if self.is_local:
            return None
        r = self.region or "us-east-1"
        return f"https://{r}.console.aws.amazon.com/sagemaker/home?region={r}#/jobs/{self.name}"

    @property
    def log_group(self) -> str:
        return LOG_GROUP

    @property
    def log_stream_prefix(self) -> str:
        return f"{self.name}/"

    @property
    def arn(self) -> str | None:
        return None if self.is_local else self.describe().get("TrainingJobArn")

    @property
    def adapter_uri(self) -> str:
        """Where the adapter lands: runs/<name>/model/ or the job's S3 output prefix
        (uncompressed: disable_output_compression)."""
        if self.is_local:
            return str(self.local_dir / "model")
        if self.output_s3_uri:
            return f"{self.output_s3_uri}/{self.name}/output/model/"
        artifacts = self.describe().get("ModelArtifacts", {}).get("S3ModelArtifacts", "")
        return artifacts.rstrip("/") + "/"

    @classmethod
    def attach(cls, name: str, region: str | None = None, profile: str | None = None) -> Job:
        """A handle on an existing job: a local run if runs/<name>/ exists, else SageMaker."""
        from launcher.local import runs_dir

        root = runs_dir() / name
        if (root / "job.json").is_file():
            return cls(name=name, local_dir=root)
        return cls(name=name, region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
                   profile=profile)

    def as_dict(self) -> dict[str, Any]:
        out = {"job_name": self.name, "local": self.is_local, "adapter": self.adapter_uri if not self.request else None}
        if self.is_local:
            out["run_dir"] = str(self.local_dir)
        else:
            out.update(region=self.region, console_url=self.console_url, log_group=self.log_group,
                       log_stream_prefix=self.log_stream_prefix, checkpoint_s3_uri=self.checkpoint_s3_uri)
        if self.request is not None:
            out["dry_run"] = True
            out["request"] = self.request
        return out | self.extra

    # ------------------------------------------------------------ state
    def _sm(self):
        from launcher.aws import client

        return client("sagemaker", self.region, self.profile)

    def describe(self) -> dict[str, Any]:
        """DescribeTrainingJob (or the local run's job.json, in the same field names)."""
        if self.is_local:
            from launcher.local import finish, read_state

            state = read_state(self.local_dir)
            pid = state.get("pid")
            if state.get("status") == "InProgress" and pid and not _alive(pid):
                state = finish(self.local_dir, state.get("exit_code") or -1)
            return {
                "TrainingJobName": self.name,
                "TrainingJobStatus": state.get("status", "Unknown"),
                "SecondaryStatus": {"InProgress": "Training"}.get(state.get("status"), state.get("status")),
                "FailureReason": state.get("failure_reason"),
                "TrainingStartTime": state.get("started"),
                "TrainingEndTime": state.get("ended"),
                "ModelArtifacts": {"S3ModelArtifacts": str(self.local_dir / "model")},
            }
        from launcher.aws import translated

        with translated(f"describe {self.name}"):
            return self._sm().describe_training_job(TrainingJobName=self.name)

    def status(self) -> str:
        return self.describe()["TrainingJobStatus"]

    def wait(self, poll_s: float = 30.0) -> dict[str, Any]:
        """Block until the job ends; JobFailed if it Failed or was Stopped."""
        while True:
            desc = self.describe()
            if desc["TrainingJobStatus"] in TERMINAL:
                break
            time.sleep(poll_s)
        if desc["TrainingJobStatus"] != "Completed":
            raise JobFailed(f"job {self.name} {desc['TrainingJobStatus']}: {desc.get('FailureReason') or 'no reason given'}",
                            f"sm-qlora logs {self.name}")
        return desc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def launch_job(config: str | Path | dict | JobConfig, *, overrides: list[str] | tuple[str, ...] = (),
               local: bool = False, dry_run: bool = False, resume: str | None = None,
               wait: bool = False, echo: bool = False) -> Job:
    """Validate `config` and start the training job.

    - SageMaker (default): uploads local data and code once (content-addressed), submits a
      HuggingFace Estimator job and returns at once unless `wait`.
    - `local=True`: runs the same entrypoint here under runs/<job>/ and returns when it ends.
    - `dry_run=True`: builds the exact CreateTrainingJob request (job.request) and sends nothing.
    - `resume=JOB`: continue from JOB's checkpoints (SageMaker: a new job on JOB's checkpoint
      S3 URI; local: the same runs/JOB/).
    """
    cfg = load_config(config, overrides)
    if local:
        if dry_run:
            raise ConfigError([("--dry-run", "is for SageMaker jobs; --local sends nothing anyway")])
        return run_local(cfg, resume=resume, echo=echo)
    from launcher.submit import submit

    result = submit(cfg, dry_run=dry_run, resume=resume)
    job = Job(name=result["job_name"], region=cfg.aws.region, profile=cfg.aws.profile,
              output_s3_uri=result["output_s3_uri"], checkpoint_s3_uri=result["checkpoint_s3_uri"],
              request=result.get("request"), extra={"strategy": result["strategy"], "uploaded": result["uploaded"]})
    if wait and not dry_run:
        job.wait()
    return job


def run_local(cfg: JobConfig, resume: str | None = None, echo: bool = False) -> Job:
    """Run in the foreground; Ctrl-C or SIGTERM makes the entrypoint checkpoint and stop."""
    from launcher import local
    from launcher.submit import job_name_for

    name = resume or job_name_for(cfg.job_name)
    root, proc = local.start(cfg, name, resume=bool(resume))
    job = Job(name=name, local_dir=root)
    log = root / "output" / "job.log"

    interrupted = []

    def forward(signum, frame):
        interrupted.append(signum)
        local.stop(root)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        offset = log.stat().st_size if resume and log.exists() else 0
        while True:
            code = proc.poll()
            if echo:
                offset = _echo_new(log, offset)
            if code is not None:
                break
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    state = local.finish(root, proc.returncode)
    job.extra["status"] = state["status"]
    if state["status"] != "Completed" and interrupted:
        raise Interrupted(f"local run {name} interrupted; its newest checkpoint is in {root / 'checkpoints'}",
                          f"resume with: sm-qlora launch CONFIG --local --resume {name}")
    if state["status"] != "Completed":
        hint = (f"resume with: sm-qlora launch CONFIG --local --resume {name}"
                if state["status"] == "Stopped" else f"see {log}")
        raise JobFailed(f"local run {name} {state['status']}: {state['failure_reason']}", hint)
    return job


def _echo_new(log: Path, offset: int) -> int:
    if not log.exists():
        return offset
    with log.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    if b"\n" in chunk:
        complete = chunk[: chunk.rfind(b"\n") + 1]
        print(complete.decode(errors="replace"), end="", flush=True)
        return offset + len(complete)
    return offset


__all__ = ["Job", "launch_job", "AWSError", "JobFailed"]
