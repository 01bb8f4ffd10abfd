"""Submitting a training job: the one place that talks to the SageMaker SDK.

It uploads what is local, describes the job as a `JobSpec` and hands it to the adapter of the
SDK major that is installed: launcher/sdk_v2.py (v2's HuggingFace Estimator) or
launcher/sdk_v3.py (3.x's ModelTrainer). Both send the same CreateTrainingJob request, field
for field (tests/e2e/test_sdk_majors.py holds them to one fixture). The SDK is imported
inside the adapters: `import sagemaker` costs seconds, and `--help` / `validate` must not pay it.

- code and data are uploaded here to content-addressed keys, and the adapter gets s3:// URIs,
  so the SDK uploads nothing itself (and `--dry-run` sends nothing);
- the container entry point replaces the image's PID 1 with a wrapper that still runs the
  image's start script and `train`, and passes SIGTERM on (see launcher/container_entry.py).
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from entrypoint import container
from entrypoint.hyperparams import Strategy, flatten
from entrypoint.progress import METRIC_DEFINITIONS
from launcher import images, sdk_v2, sdk_v3
from launcher.api_limits import job_environment, launcher_tags, max_wait_s, runtime_s
from launcher.aws import client, is_not_found, session, split_s3, translated
from launcher.channels import input_channels
from launcher.config import JobConfig, job_name_for
from launcher.container_entry import container_entry_point
from launcher.errors import AWSError, ConfigError, LauncherError
from launcher.instances import catalog
from launcher.job_spec import JobSpec
from launcher.plan import micro_batch_rows

ENTRY_SCRIPT = container.ENTRY_SCRIPT
MERGE_SCRIPT = container.MERGE_SCRIPT
# The training toolkit pip-installs this file at every job start. A floor, not a pin: the
# HF image ships bitsandbytes, so pip finds it satisfied and downloads nothing (a job in a
# VPC without internet access starts too).
REQUIREMENTS = "bitsandbytes>=0.46\n"
# The source dir, named in code so that an installed package ships the same files as a
# git checkout, and a stray or planted file next to them never travels. A test holds this
# list equal to the tracked entrypoint/*.py. `merge` is the merge job's module (issue 12);
# a module of this list that is absent is left out.
SOURCE_MODULES = ("__init__", "__main__", "card", "checkpoints", "container", "data", "head", "hyperparams",
                  "kernels", "merge", "model", "moe", "offload", "optim", "progress", "projections", "stopping",
                  "train", "experts_tf5")
REDACTED = "***redacted***"
SENSITIVE = ("TOKEN", "SECRET_VALUE", "PASSWORD", "API_KEY", "ACCESS_KEY")


def sdk_adapter():
    """The adapter of the installed SDK major; only this module ever asks which."""
    return sdk_v3 if int(version("sagemaker").split(".")[0]) >= 3 else sdk_v2


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_files() -> dict[str, bytes]:
    """The source dir by name: entry scripts, requirements.txt and the modules of
    SOURCE_MODULES read from the installed entrypoint package. A symlink is refused, not
    followed: what it points at is not the package's."""
    pkg = Path(__file__).resolve().parent.parent / "entrypoint"
    files: dict[str, bytes] = {
        ENTRY_SCRIPT: b"from entrypoint.train import main\n\nmain()\n",
        MERGE_SCRIPT: b"from entrypoint.merge import main\n\nmain()\n",
        "requirements.txt": REQUIREMENTS.encode(),
    }
    for module in SOURCE_MODULES:
        path = pkg / f"{module}.py"
        if path.is_symlink():
            raise LauncherError(f"{path} is a symlink; the source dir ships only the package's own files",
                                "replace it with the file itself")
        if path.is_file():
            files[f"entrypoint/{module}.py"] = path.read_bytes()
    return files


def code_tarball(files: dict[str, bytes] | None = None) -> bytes:
    """The source dir packed byte-for-byte reproducibly (sorted, zero mtimes), so its
    hash names it."""
    files = source_files() if files is None else files
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


class Uploads:
    """Content-addressed uploads under `output.s3_uri/uploads/<sha256[:16]>/<name>`: the
    same bytes are uploaded once, however many jobs use them."""

    def __init__(self, cfg: JobConfig, dry_run: bool):
        self.prefix = f"{cfg.output.s3_uri}/uploads"
        self.dry_run = dry_run
        self.s3 = None if dry_run else client("s3", cfg.aws.region, cfg.aws.profile)
        self.uploaded: list[str] = []

    def _exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if is_not_found(exc):
                return False
            raise

    def _once(self, uri: str, send) -> str:
        """send(bucket, key) unless the object is there already (or this is a dry run)."""
        if not self.dry_run and not self._exists(uri):
            send(*split_s3(uri))
            self.uploaded.append(uri)
        return uri

    def file(self, path: Path) -> str:
        return self._once(f"{self.prefix}/{sha256_file(path)[:16]}/{path.name}",
                          lambda bucket, key: self.s3.upload_file(str(path), bucket, key))

    def blob(self, data: bytes, name: str) -> str:
        return self._once(f"{self.prefix}/{hashlib.sha256(data).hexdigest()[:16]}/{name}",
                          lambda bucket, key: self.s3.put_object(Bucket=bucket, Key=key, Body=data))

    def directory(self, path: Path) -> str:
        """A local model directory: hashed over names and contents, uploaded file by file,
        then marked complete (the marker is what a second launch looks for)."""
        files = sorted(p for p in path.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(path).as_posix().encode() + b"\0" + sha256_file(p).encode())
        uri = f"{self.prefix}/{h.hexdigest()[:16]}/{path.name}"

        def send(bucket: str, marker_key: str) -> None:
            for p in files:
                self.s3.upload_file(str(p), bucket, f"{marker_key.rsplit('/', 1)[0]}/{p.relative_to(path).as_posix()}")
            self.s3.put_object(Bucket=bucket, Key=marker_key, Body=b"")

        self._once(f"{uri}/.sm-qlora-complete", send)
        return uri


def redact(obj: Any) -> Any:
    """Blank every value whose key looks like a secret (defence in depth: the token is
    never put in the request in the first place)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if any(s in str(k).upper() for s in SENSITIVE) and isinstance(v, str) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def job_spec(cfg: JobConfig, *, name: str, strategy: str, hyperparameters: dict, source_dir: str,
             inputs: dict[str, str], checkpoint_s3_uri: str, tags: list[dict], max_runtime_s: int | None,
             image: images.Image) -> JobSpec:
    c = cfg.compute
    max_run = runtime_s(cfg, max_runtime_s)
    environment = job_environment(cfg, max_run)
    max_wait = max_wait_s(cfg, max_run) if c.spot else None
    return JobSpec(
        name=name, region=cfg.aws.region, role=cfg.aws.role, bucket=split_s3(cfg.output.s3_uri)[0],
        image_uri=c.image_uri, image=image, instance_type=c.instance_type, instance_count=c.instance_count,
        volume_size_gb=c.volume_size_gb, max_run_s=max_run, max_wait_s=max_wait, source_dir=source_dir,
        entry_script=ENTRY_SCRIPT, hyperparameters=hyperparameters,
        distributed=strategy == "ddp",  # ddp: one process per GPU through torchrun; the others one process
        environment=environment, output_path=f"{cfg.output.s3_uri}/jobs", checkpoint_s3_uri=checkpoint_s3_uri,
        checkpoint_local_path=str(container.CHECKPOINT_PATH), metric_definitions=METRIC_DEFINITIONS, tags=tags,
        inputs=inputs, container_entry_point=container_entry_point(ENTRY_SCRIPT))


class _DryRun:
    """Captures CreateTrainingJob's parameters, answers it with a made-up ARN, and refuses
    every other call: with it in place, nothing leaves this machine."""

    def __init__(self):
        self.request: dict | None = None

    def register(self, events) -> None:
        events.register("before-parameter-build.sagemaker.CreateTrainingJob", self.capture)
        events.register("before-call.*.*", self.answer)

    def capture(self, params, **kwargs):
        self.request = copy.deepcopy(params)

    def answer(self, model, **kwargs):
        if model.name == "CreateTrainingJob":
            from botocore.awsrequest import AWSResponse

            name = (self.request or {}).get("TrainingJobName", "dry-run")
            return (AWSResponse("dry-run", 200, {}, None),
                    {"TrainingJobArn": f"arn:aws:sagemaker:dry-run:000000000000:training-job/{name}"})
        raise RuntimeError(f"dry run: refusing to send {model.name}")


def previous_job(cfg: JobConfig, job: str, dry_run: bool) -> tuple[str, str | None]:
    """The job to resume: its checkpoint S3 URI and its TrainingImage (None in a dry run)."""
    if dry_run:  # sends nothing: where this tool puts a job's checkpoints
        return f"{cfg.output.s3_uri}/checkpoints/{job}", None
    sm = client("sagemaker", cfg.aws.region, cfg.aws.profile)
    with translated(f"describe {job}"):
        desc = sm.describe_training_job(TrainingJobName=job)
    uri = desc.get("CheckpointConfig", {}).get("S3Uri")
    if not uri:
        raise ConfigError([("--resume", f"job {job} has no checkpoint S3 URI to resume from")])
    return uri, desc.get("AlgorithmSpecification", {}).get("TrainingImage")


def job_image(cfg: JobConfig, resumed_image: str | None) -> images.Image:
    """compute.image; `auto` resuming a job keeps that job's HF image: its checkpoints hold an
    adapter in its transformers major's layout (expert LoRA as w1/w2/w3 modules on 4, as
    gate_up_proj/down_proj parameters on 5), which the other major's job refuses to resume."""
    if cfg.compute.image == "auto" and resumed_image:
        with contextlib.suppress(ValueError):  # an image of the user's own before: auto as usual
            return images.resolve(resumed_image.rsplit(":", 1)[-1])
    return images.for_job(cfg)


@dataclass(frozen=True)
class Submitted:
    """What submit() did: the job's name and where its results will be."""

    job_name: str
    strategy: str
    uploaded: list[str]
    checkpoint_s3_uri: str
    output_s3_uri: str
    request: dict | None  # the CreateTrainingJob parameters, secrets redacted (dry run only)
    source_files: list[str]  # what the source dir tarball holds


def submit(cfg: JobConfig, strategy: Strategy, *, dry_run: bool = False, resume: str | None = None,
           max_runtime_s: int | None = None) -> Submitted:
    """Upload what is local, describe the job and create it through the installed SDK.

    `strategy` is the caller's decision (launch_job: the plan's); this only maps it.
    `max_runtime_s` (a budget) replaces compute.max_run_hours as MaxRuntimeInSeconds.
    The config was checked by validate_for_launch (the one set of rules `validate` runs).
    """
    name = job_name_for(cfg.job_name)
    # before any upload: a region without the HF image, or a job to resume that does not exist, stops here
    if not cfg.compute.image_uri:
        try:
            sdk_adapter().known_image_uri(cfg.aws.region, cfg.compute.instance_type)
        except ValueError as exc:
            raise ConfigError([("aws.region", f"the Hugging Face training image is not published in "
                                f"{cfg.aws.region} ({exc}): choose another region, or name an image of your "
                                "own there in compute.image_uri")]) from None
    checkpoint_s3_uri, resumed_image = (previous_job(cfg, resume, dry_run) if resume
                                        else (f"{cfg.output.s3_uri}/checkpoints/{name}", None))
    uploads = Uploads(cfg, dry_run)
    hp = cfg.hyperparameters(strategy, rows=micro_batch_rows(cfg, catalog().get(cfg.compute.instance_type)))
    files = source_files()
    inputs: dict[str, str] = {}
    with translated("upload inputs to S3"):
        for channel in input_channels(hp):
            uri = channel.source
            if channel.is_local:
                uri = uploads.directory(Path(uri)) if channel.name == "model" else uploads.file(Path(uri))
            inputs[channel.name] = uri
            section, key = channel.field.split(".")
            setattr(getattr(hp, section), key, uri)  # the job sees where its input came from, not a laptop path
        source_dir = uploads.blob(code_tarball(files), "sourcedir.tar.gz")
    tags = launcher_tags(cfg, resume)

    spec = job_spec(cfg, name=name, strategy=strategy, hyperparameters=flatten(hp), source_dir=source_dir,
                    inputs=inputs, checkpoint_s3_uri=checkpoint_s3_uri, tags=tags, max_runtime_s=max_runtime_s,
                    image=job_image(cfg, resumed_image))
    boto_sess = session(cfg.aws.region, cfg.aws.profile)
    if dry_run:
        # A fresh botocore session of our own, so the hook never leaks into later calls.
        import boto3

        boto_sess = boto3.Session(region_name=cfg.aws.region, profile_name=cfg.aws.profile)
        hook = _DryRun()
        hook.register(boto_sess.events)
    with translated("create the training job"):
        try:
            sdk_adapter().create_training_job(spec, boto_sess)
        except RuntimeError as exc:
            if dry_run and "dry run" in str(exc):
                raise AWSError(f"internal: {exc}") from None
            raise
    return Submitted(job_name=name, strategy=strategy, uploaded=uploads.uploaded,
                     checkpoint_s3_uri=checkpoint_s3_uri, output_s3_uri=f"{cfg.output.s3_uri}/jobs",
                     request=redact(hook.request) if dry_run else None, source_files=sorted(files))
