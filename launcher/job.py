"""`launch_job()` and the `Job` handle: the product's Python API. The CLI is a thin
shell over these.

One `Job` over two small backends, as SkyPilot keeps one handle over many clouds:
`SageMakerBackend` (launcher/sagemaker_job.py) and `LocalBackend` (launcher/local.py),
each with describe, stop, log_source and artifacts. Attributes never touch the network;
methods do.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from launcher import local
from launcher.aws import region_or_error
from launcher.config import JobConfig, is_job_name, job_name_for, load_config
from launcher.errors import ConfigError, Interrupted, JobFailed, LauncherError, disk_error
from launcher.local import LocalBackend, missing_train_modules, runs_dir
from launcher.logs import (
    LOG_GROUP,
    TERMINAL,
    LogLine,
    StateChange,
    cost_so_far,
    follow_lines,
    progress_of,
    timestamp_s,
)
from launcher.merge import merge_job
from launcher.plan import budget_runtime_s, choose_strategy
from launcher.plot import write_loss_png
from launcher.sagemaker_job import SageMakerBackend, list_sagemaker_jobs
from launcher.submit import submit
from launcher.validate import validate_for_launch


class Backend(Protocol):
    local: bool
    region: str | None

    def describe(self) -> dict[str, Any]: ...
    def stop(self) -> bool: ...
    def log_source(self): ...
    def adapter_uri(self, desc: dict | None) -> str | None: ...
    def artifacts(self, adapter_uri: str) -> list[tuple[str, Callable[[Path], None]]]: ...
    def default_plot_path(self) -> Path: ...
    def console_url(self) -> str | None: ...


@dataclass
class Job:
    """A training job on SageMaker, or a local run under runs/<name>/."""

    name: str
    backend: Backend
    submitted: Any = None  # what launch_job sent (launcher.submit.Submitted); None for an attached job
    arn: str | None = None
    last_description: dict | None = field(default=None, repr=False)

    # ------------------------------------------------------------ where things are (no I/O)
    @classmethod
    def attach(cls, name: str, region: str | None = None, profile: str | None = None) -> Job:
        """A handle on an existing job: a local run if runs/<name>/ exists, else SageMaker."""
        if not is_job_name(name):  # before the name becomes a path (runs/<name>, <name>-loss.png)
            raise ConfigError([("JOB", f"{name[:80]!r} is not a job name (letters, digits and hyphens, "
                                       "at most 63, like tiny-test-20261129-101500)")])
        root = runs_dir() / name
        if (root / "job.json").is_file():
            return cls(name=name, backend=LocalBackend(name, root))

        region = region_or_error(region, profile, f"job {name} (it is not a local run under {runs_dir()})")
        return cls(name=name, backend=SageMakerBackend(name, region, profile))

    @property
    def is_local(self) -> bool:
        return self.backend.local

    @property
    def local_dir(self) -> Path | None:
        return self.backend.root if self.is_local else None

    @property
    def region(self) -> str | None:
        return self.backend.region

    @property
    def request(self) -> dict | None:
        """The CreateTrainingJob request of a dry run."""
        return getattr(self.submitted, "request", None)

    @property
    def console_url(self) -> str | None:
        return self.backend.console_url()

    @property
    def log_group(self) -> str | None:
        return None if self.is_local else LOG_GROUP

    @property
    def log_stream_prefix(self) -> str:
        return f"{self.name}/"

    @property
    def adapter_uri(self) -> str | None:
        """Where the adapter lands: runs/<name>/model/ or the job's S3 output prefix (None
        until a description says where, for a SageMaker job this session did not launch)."""
        return self.backend.adapter_uri(self.last_description)

    def as_dict(self) -> dict[str, Any]:
        out = {"job_name": self.name, "local": self.is_local, "adapter": None if self.request else self.adapter_uri}
        if self.is_local:
            out["run_dir"] = str(self.local_dir)
            if self.last_description:
                out["status"] = self.last_description["TrainingJobStatus"]
        else:
            out.update(region=self.region, console_url=self.console_url, log_group=self.log_group,
                       log_stream_prefix=self.log_stream_prefix, arn=self.arn,
                       checkpoint_s3_uri=getattr(self.submitted, "checkpoint_s3_uri", None))
        if self.submitted is not None:
            out.update(strategy=self.submitted.strategy, uploaded=self.submitted.uploaded)
        if self.request is not None:
            out.update(dry_run=True, request=self.request, source_files=self.submitted.source_files)
        return out

    # ------------------------------------------------------------ state (I/O)
    def describe(self) -> dict[str, Any]:
        """DescribeTrainingJob (or the local run's job.json, in the same field names)."""
        self.last_description = self.backend.describe()
        self.arn = self.arn or self.last_description.get("TrainingJobArn")
        return self.last_description

    def status(self) -> str:
        return self.describe()["TrainingJobStatus"]

    def log_source(self):
        return self.backend.log_source()

    def lines(self, follow: bool = False, **kwargs) -> Iterator[LogLine | StateChange]:
        """The job's log lines, each once with its parsed progress event, and its state
        changes; with `follow`, until the job ends. kwargs: poll_s, describe_every_s,
        sleep, warn (see launcher.logs.follow_lines)."""
        return follow_lines(self, follow=follow, **kwargs)

    def progress(self, limit: int | None = 200):
        """What the job's log says: from its last `limit` lines per stream, or every line."""
        return progress_of(self, limit)

    def summary(self) -> dict[str, Any]:
        """State, secondary status, last progress, elapsed time, cost so far."""
        desc = self.describe()
        p = self.progress()
        start = desc.get("TrainingStartTime") or desc.get("CreationTime")
        end = desc.get("TrainingEndTime")
        elapsed = round((timestamp_s(end) or time.time()) - timestamp_s(start)) if start is not None else None
        last = p.last_train.typed() if p.last_train else {}  # numbers as numbers in --output json
        return {
            "job_name": self.name, "local": self.is_local, "status": desc.get("TrainingJobStatus"),
            "secondary_status": desc.get("SecondaryStatus"), "failure_reason": desc.get("FailureReason"),
            "step": p.step, "total_steps": p.total, "loss": last.get("loss"), "eta": last.get("eta"),
            "tokens_per_sec": last.get("tokens_per_sec"),
            "eval_loss": p.eval_loss[-1][1] if p.eval_loss else None,
            "elapsed_s": elapsed, "cost": cost_so_far(desc),
            "instance_type": desc.get("ResourceConfig", {}).get("InstanceType"),
            "adapter": self.adapter_uri if desc.get("TrainingJobStatus") == "Completed" else None,
        }

    # ------------------------------------------------------------ control
    def stop(self) -> bool:
        """Stop the job; its checkpoints stay. False if it had already ended."""
        return self.backend.stop()

    def download(self, dest: str | Path) -> list[Path]:
        """Fetch the adapter files into dest; the job must have Completed. Every file lands
        inside dest: a key that would leave it (`../`) is refused before anything is written."""
        status = self.status()
        if status != "Completed":
            raise JobFailed(f"job {self.name} is {status}: there is no adapter to download",
                            f"sm-qlora status {self.name}")
        dest = Path(dest)
        if dest.exists() and not dest.is_dir():
            raise ConfigError([("DEST", f"{dest} is a file; name a directory to download into")])
        files = self.backend.artifacts(self.adapter_uri)
        if not files:
            raise JobFailed(f"no files under {self.adapter_uri}", "the job may have failed to save; see its logs")
        targets = [(inside(dest, rel, self.adapter_uri), fetch) for rel, fetch in files]
        return fetch_staged(dest, targets, f"download {self.name} into {dest}")

    def merge(self, dest: str | Path | None = None, **options) -> dict[str, Any]:
        """The base model with this job's adapter merged in (bf16 safetensors): on this
        machine for a local run, as a small SageMaker job for a SageMaker one."""
        return merge_job(self, dest, **options)

    def plot(self, path: str | Path | None = None) -> Path:
        """Write a PNG of training and eval loss against steps, from every line of the job's
        logs. A job that does not exist is an error, not an empty plot."""
        self.describe()
        return write_loss_png(self.progress(limit=None), Path(path) if path else self.backend.default_plot_path(),
                              self.name)

    def wait(self, poll_s: float = 30.0) -> dict[str, Any]:
        """Block until the job ends; JobFailed if it Failed or was Stopped."""
        while (desc := self.describe())["TrainingJobStatus"] not in TERMINAL:
            time.sleep(poll_s)
        if desc["TrainingJobStatus"] != "Completed":
            raise JobFailed(f"job {self.name} {desc['TrainingJobStatus']}: {desc.get('FailureReason') or 'no reason given'}",
                            f"sm-qlora logs {self.name}")
        return desc


def inside(dest: Path, rel: str, source: str) -> Path:
    """dest/rel, refused when it resolves outside dest (a `../` or absolute key)."""
    root = dest.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root) or target == root:
        raise LauncherError(f"refusing to download {source}{rel}: it would be written outside {dest}",
                            "the adapter's files hold a path that leaves the destination; nothing was written")
    return target


def fetch_staged(dest: Path, targets: list[tuple[Path, Callable[[Path], None]]], action: str) -> list[Path]:
    """Fetch every file into a staging directory inside dest, then move them into place:
    a full disk or a dropped connection leaves dest as it was, never a 0-byte file beside
    complete-looking weights. Disk errors are one line naming the path and the cause."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".sm-qlora-download-", dir=dest))
    except OSError as exc:
        raise disk_error(exc, action) from None
    try:
        staged = []
        for target, fetch in targets:
            part = stage / target.relative_to(dest.resolve())
            try:
                part.parent.mkdir(parents=True, exist_ok=True)
                fetch(part)
            except OSError as exc:  # named as the file the user asked for, not the staging copy
                raise disk_error(OSError(exc.errno, exc.strerror, str(target)), action) from None
            staged.append((part, target))
        for part, target in staged:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, target)
            except OSError as exc:
                raise disk_error(exc, action) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [target for _, target in staged]


# --------------------------------------------------------------------------- listing

@dataclass
class JobList:
    jobs: list[dict[str, Any]]          # job_name, status, where (local|sagemaker), created (epoch s)
    sagemaker_unavailable: str | None   # why SageMaker jobs are missing, when local runs were listed
    skipped: list[str] = field(default_factory=list)  # local runs whose job.json could not be read


def list_jobs(region: str | None = None, profile: str | None = None, max_results: int = 20) -> JobList:
    """Recent local runs and SageMaker jobs, newest first."""
    rows, skipped = [], []
    root = runs_dir()
    if root.is_dir():
        for d in sorted(root.iterdir(), reverse=True):
            if not (d / "job.json").is_file():
                continue
            try:  # settle: a run whose owner was killed reads as ended, as `status` would say
                state = local.settle(d)
                rows.append({"job_name": d.name, "status": state.get("status"), "where": "local",
                             "created": float(state.get("started") or 0) or None})
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                skipped.append(f"{d / 'job.json'}: {type(exc).__name__}: {str(exc)[:120]}")
    missing = None
    try:

        rows += list_sagemaker_jobs(region_or_error(region, profile, "SageMaker jobs"), profile, max_results)
    except LauncherError as exc:  # no credentials or region: local runs are still worth listing
        if not rows:
            raise
        missing = str(exc)
    rows = sorted(rows, key=lambda r: r["created"] or 0, reverse=True)[:max_results]
    return JobList(rows, missing, skipped)


# --------------------------------------------------------------------------- launching

def launch_job(config: str | Path | dict | JobConfig, *, overrides: list[str] | tuple[str, ...] = (),
               local: bool = False, dry_run: bool = False, resume: str | None = None,
               wait: bool = False, echo: bool = True) -> Job:
    """Validate `config` and start the training job.

    - SageMaker (default): uploads local data and code once (content-addressed), submits a
      training job through the installed SageMaker SDK (v2 or 3.x, the same request) and
      returns at once unless `wait`.
    - `local=True`: runs the same entrypoint here under runs/<job>/ and returns when it ends,
      printing the job's log lines as they come (`echo=False` keeps it quiet). Needs the
      `[train]` extra.
    - `dry_run=True`: builds the exact CreateTrainingJob request (job.request) and sends nothing.
    - `resume=JOB`: continue from JOB's checkpoints (SageMaker: a new job on JOB's checkpoint
      S3 URI; local: the same runs/JOB/, which must be neither running nor Completed).
    """
    cfg = load_config(config, overrides)
    if local and dry_run:
        raise ConfigError([("--dry-run", "is for SageMaker jobs; --local sends nothing anyway")])
    validate_for_launch(cfg, local=local, resume=resume)  # what `validate` checks: exit 2, nothing sent
    if local:
        missing = missing_train_modules()
        if missing:
            raise ConfigError([("--local", f"a local run needs {', '.join(missing)}, which this Python lacks")],
                              "pip install 'sagemaker-qlora[train]'")
        return run_local(cfg, resume=resume, echo=echo,
                         config_path=str(config) if isinstance(config, (str, Path)) else None)

    submitted = submit(cfg, choose_strategy(cfg), dry_run=dry_run, resume=resume,
                       max_runtime_s=budget_runtime_s(cfg))
    job = Job(name=submitted.job_name, submitted=submitted,
              backend=SageMakerBackend(submitted.job_name, cfg.aws.region, cfg.aws.profile, submitted.output_s3_uri))
    if not dry_run:
        job.describe()  # the ARN, and a job that exists
        if wait:
            job.wait()
    return job


def run_local(cfg: JobConfig, resume: str | None = None, echo: bool = True, config_path: str | None = None) -> Job:
    """Run in the foreground; Ctrl-C, SIGTERM or a hang-up makes the entrypoint
    checkpoint and stop."""
    root, state, received = local.run(cfg, resume or job_name_for(cfg.job_name), resume=bool(resume), echo=echo)
    name = root.name  # runs/<name>-2/ when another launch took the name this second
    job = Job(name=name, backend=local.LocalBackend(name, root))
    job.describe()
    resume_hint = f"resume with: sm-qlora launch {config_path or 'CONFIG'} --local --resume {name}"
    if state["status"] != "Completed" and received:
        raise Interrupted(f"local run {name} interrupted; its newest checkpoint is in {root / 'checkpoints'}",
                          resume_hint)
    if state["status"] != "Completed":
        hint = resume_hint if state["status"] == "Stopped" else f"see {root / 'output' / 'job.log'}"
        raise JobFailed(f"local run {name} {state['status']}: {state['failure_reason']}", hint)
    return job


__all__ = ["Job", "launch_job", "list_jobs"]
