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
from launcher.errors import ConfigError, Interrupted, JobFailed
from launcher.logs import LOG_GROUP, TERMINAL


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
        if self.is_local or self.request is not None:
            return None
        return self.extra.get("arn") or self.describe().get("TrainingJobArn")

    @property
    def adapter_uri(self) -> str:
        return self.adapter_uri_from()

    def adapter_uri_from(self, desc: dict | None = None) -> str:
        """Where the adapter lands: runs/<name>/model/ or the job's S3 output prefix
        (uncompressed: disable_output_compression puts the files under
        <S3OutputPath>/<job>/output/model/)."""
        if self.is_local:
            return str(self.local_dir / "model")
        if self.output_s3_uri:
            return f"{self.output_s3_uri}/{self.name}/output/model/"
        output = (desc or self.describe()).get("OutputDataConfig", {}).get("S3OutputPath", "").rstrip("/")
        return f"{output}/{self.name}/output/model/"

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

    # ------------------------------------------------------------ following and control
    def log_source(self):
        from launcher.logs import CloudWatchSource, FileSource

        if self.is_local:
            return FileSource(self.local_dir / "output" / "job.log")
        from launcher.aws import client

        return CloudWatchSource(self.name, client("logs", self.region, self.profile))

    def logs(self, follow: bool = False, as_json: bool = False, poll_s: float = 5.0) -> int:
        """Print the log (and follow it to the end); returns the SPEC exit code."""
        from launcher.logs import follow as follow_logs

        return follow_logs(self, as_json=as_json, follow=follow, poll_s=poll_s)

    def progress(self):
        from launcher.logs import describe_progress

        return describe_progress(self)

    def summary(self) -> dict[str, Any]:
        """State, secondary status, last progress, elapsed time, cost so far."""
        from launcher.logs import cost_so_far, price_of, timestamp_s

        desc = self.describe()
        p = self.progress()
        start = desc.get("TrainingStartTime") or desc.get("CreationTime")
        end = desc.get("TrainingEndTime")
        elapsed = round((timestamp_s(end) or time.time()) - timestamp_s(start)) if start is not None else None
        last = p.last_train.values if p.last_train else {}
        return {
            "job_name": self.name, "local": self.is_local, "status": desc.get("TrainingJobStatus"),
            "secondary_status": desc.get("SecondaryStatus"), "failure_reason": desc.get("FailureReason"),
            "step": p.step, "total_steps": p.total, "loss": last.get("loss"), "eta": last.get("eta"),
            "tokens_per_sec": last.get("tokens_per_sec"),
            "eval_loss": p.eval_loss[-1][1] if p.eval_loss else None,
            "elapsed_s": elapsed, "cost": cost_so_far(desc, price_of(desc)),
            "instance_type": desc.get("ResourceConfig", {}).get("InstanceType"),
            "adapter": self.adapter_uri_from(desc) if desc.get("TrainingJobStatus") == "Completed" else None,
        }

    def stop(self) -> bool:
        """Stop the job; its checkpoints stay. False if it had already ended."""
        if self.is_local:
            from launcher import local

            return local.stop(self.local_dir)
        from launcher.aws import translated

        if self.describe()["TrainingJobStatus"] in TERMINAL:
            return False
        with translated(f"stop {self.name}"):
            self._sm().stop_training_job(TrainingJobName=self.name)
        return True

    def download(self, dest: str | Path) -> list[Path]:
        """Fetch the adapter files into dest; the job must have Completed."""
        import shutil

        dest = Path(dest)
        status = self.describe()["TrainingJobStatus"]
        if status != "Completed":
            raise JobFailed(f"job {self.name} is {status}: there is no adapter to download",
                            f"sm-qlora status {self.name}")
        dest.mkdir(parents=True, exist_ok=True)
        if self.is_local:
            out = []
            for f in sorted((self.local_dir / "model").rglob("*")):
                if f.is_file():
                    target = dest / f.relative_to(self.local_dir / "model")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)
                    out.append(target)
            return out
        from launcher.aws import client, split_s3, translated

        bucket, prefix = split_s3(self.adapter_uri)
        s3 = client("s3", self.region, self.profile)
        out = []
        with translated(f"download {self.adapter_uri}"):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):].lstrip("/")
                    if not rel:
                        continue
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, obj["Key"], str(target))
                    out.append(target)
        if not out:
            raise JobFailed(f"no files under {self.adapter_uri}", "the job may have failed to save; see its logs")
        return out

    def plot(self, path: str | Path | None = None) -> Path:
        """Write a PNG of training and eval loss against steps, from the job's logs."""
        from launcher.logs import describe_progress
        from launcher.plot import write_loss_png

        progress = describe_progress(self, limit=10000)
        default = (self.local_dir / "loss.png") if self.is_local else Path(f"{self.name}-loss.png")
        return write_loss_png(progress, Path(path) if path else default, self.name)

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
    from launcher.plan import check_fits
    from launcher.submit import submit

    check_fits(cfg)  # an instance that cannot hold the model: exit 2, nothing sent
    result = submit(cfg, dry_run=dry_run, resume=resume)
    job = Job(name=result["job_name"], region=cfg.aws.region, profile=cfg.aws.profile,
              output_s3_uri=result["output_s3_uri"], checkpoint_s3_uri=result["checkpoint_s3_uri"],
              request=result.get("request"), extra={"strategy": result["strategy"], "uploaded": result["uploaded"]})
    if not dry_run:
        job.extra["arn"] = job.describe()["TrainingJobArn"]
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


__all__ = ["Job", "launch_job"]
