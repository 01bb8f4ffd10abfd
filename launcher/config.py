"""The job config: one YAML (or JSON) file, validated in one pass.

The training sections (`model`, `data`, `lora`, `training`) are the entrypoint's own
Pydantic models, so the launcher and the job validate with the same code.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from entrypoint.hyperparams import (
    HUB_ID_PATTERN,
    DataSpec,
    Hyperparameters,
    LoraSpec,
    ModelSpec,
    Strict,
    TrainingSpec,
)
from launcher.errors import ConfigError
from launcher.instances import catalog

# SageMaker: TrainingJobName is at most 63 of [a-zA-Z0-9-], no leading or double-less rules
# beyond that pattern. We append "-YYYYmmdd-HHMMSS" (16 characters), so the base is <= 47.
JOB_NAME_SUFFIX_LEN = 16
JOB_NAME_MAX = 63 - JOB_NAME_SUFFIX_LEN
JOB_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
S3_URI_RE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
SECRET_ARN_RE = re.compile(r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[\w/+=.@-]+$")
REGION_RE = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ComputeSpec(Strict):
    instance_type: str = "ml.p4d.24xlarge"
    instance_count: int = Field(1, ge=1, le=64)
    spot: bool = False
    max_run_hours: float = Field(24, gt=0, le=672)  # SageMaker's limit is 28 days
    max_wait_hours: float | None = Field(None, gt=0, le=672)
    volume_size_gb: int = Field(200, ge=1, le=16384)
    image_uri: str | None = None  # override the pinned HF training image
    strategy: str = "auto"  # auto | ddp | model_parallel (see plan)

    @field_validator("instance_type")
    @classmethod
    def _known_instance(cls, v: str) -> str:
        cat = catalog()
        if v not in cat.instances:
            hint = cat.suggest(v)
            tail = f"; did you mean {hint}?" if hint else f"; see `sm-qlora plan` for the {len(cat.instances)} known ones"
            raise ValueError(f"{v!r} is not a SageMaker GPU training instance{tail}")
        return v

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v not in ("auto", "ddp", "model_parallel"):
            raise ValueError("must be auto, ddp or model_parallel")
        return v

    # A field validator (not a model one) so that it still runs when another field fails.
    @field_validator("max_wait_hours")
    @classmethod
    def _spot_wait(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is None:
            return v
        if not info.data.get("spot"):
            raise ValueError("max_wait_hours is only for spot jobs (set compute.spot: true)")
        run = info.data.get("max_run_hours")
        if run is not None and v < run:
            raise ValueError(
                f"must be >= max_run_hours ({v:g} < {run:g}): SageMaker counts the wait for spot capacity in it"
            )
        return v

    @model_validator(mode="after")
    def _single_instance_model_parallel(self) -> ComputeSpec:
        if self.strategy == "model_parallel" and self.instance_count > 1:
            raise ValueError("model_parallel spreads one model over one instance's GPUs; use instance_count: 1")
        return self


class OutputSpec(Strict):
    s3_uri: str

    @field_validator("s3_uri")
    @classmethod
    def _s3(cls, v: str) -> str:
        if not S3_URI_RE.match(v):
            raise ValueError(f"{v!r} is not an S3 URI like s3://my-bucket/qlora")
        return v.rstrip("/")


class AwsSpec(Strict):
    region: str = "us-east-1"
    role: str
    profile: str | None = None
    hf_token_secret: str | None = None
    # Local runs only: the name of an environment variable that holds the HF token.
    hf_token_env: str | None = None
    tags: dict[str, str] = {}

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        if not REGION_RE.match(v):
            raise ValueError(f"{v!r} is not an AWS region like us-east-1")
        return v

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if not ROLE_ARN_RE.match(v):
            raise ValueError(f"{v!r} is not an IAM role ARN like arn:aws:iam::123456789012:role/SageMakerExecutionRole")
        return v

    @field_validator("hf_token_secret")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        if v is not None and not SECRET_ARN_RE.match(v):
            raise ValueError(
                "must be a Secrets Manager ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME); "
                "never put the token itself in the config"
            )
        return v

    @field_validator("hf_token_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not ENV_NAME_RE.match(v):
            raise ValueError("must be the name of an environment variable, such as HF_TOKEN")
        if v is not None and v.startswith("hf_") and len(v) > 20:
            raise ValueError("looks like a token, not a variable name; never put the token in the config")
        return v


class JobConfig(Strict):
    job_name: str
    model: ModelSpec
    data: DataSpec
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    compute: ComputeSpec = ComputeSpec()
    output: OutputSpec
    aws: AwsSpec

    @field_validator("job_name")
    @classmethod
    def _job_name(cls, v: str) -> str:
        if not JOB_NAME_RE.match(v):
            raise ValueError(
                "SageMaker job names use only letters, digits and single or repeated hyphens, "
                "starting and ending with a letter or digit"
            )
        if len(v) > JOB_NAME_MAX:
            raise ValueError(
                f"is {len(v)} characters; at most {JOB_NAME_MAX} so that the {JOB_NAME_SUFFIX_LEN}-character "
                "timestamp suffix fits SageMaker's 63"
            )
        return v

    def hyperparameters(self, strategy: str | None = None) -> Hyperparameters:
        """The part the job sees, validated again by the same model (deep copies: submit
        rewrites local paths to S3 URIs in it, never in the config)."""
        return Hyperparameters(
            model=self.model.model_copy(deep=True), data=self.data.model_copy(deep=True),
            lora=self.lora.model_copy(deep=True), training=self.training.model_copy(deep=True),
            strategy=strategy or ("auto" if self.compute.strategy == "auto" else self.compute.strategy),
        )

    def digest(self) -> str:
        """Short hash of the whole config: tags a job with the config that made it."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- loading

def _format_errors(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and section)"
        elif e["type"] == "missing":
            msg = "required, missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        problems.append((path, msg))
    return problems


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """`--set training.learning_rate=1e-4`: values parse as YAML scalars."""
    if "=" not in assignment:
        raise ConfigError([("--set", f"{assignment!r} is not key.path=value")])
    key, _, text = assignment.partition("=")
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([("--set", f"{key} goes through a value that is not a section")])
    node[leaf] = yaml.safe_load(text) if text.strip() else None


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("", f"config file {str(path)!r} not found")])
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError([("", f"{path}: not valid YAML/JSON: {exc}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([("", f"{path}: the top level must be a mapping of sections")])
    return raw


def _local_path_problems(raw: dict[str, Any], base_dir: Path | None) -> list[tuple[str, str]]:
    """Local data files and model directories must exist. Relative paths are taken from
    the working directory, then from the config file's directory; found ones are made
    absolute in `raw`."""
    problems = []
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for field in ("train", "validation"):
        value = data.get(field)
        if not isinstance(value, str) or "://" in value:
            continue
        resolved = resolve_local(value, base_dir)
        if resolved is None:
            problems.append((f"data.{field}", f"file {value!r} not found"))
        elif resolved.is_dir():
            problems.append((f"data.{field}", f"{value!r} is a directory; name the data file"))
        else:
            data[field] = str(resolved)
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    model_id = model.get("id")
    if not isinstance(model_id, str) or not model_id:
        return problems
    if model_id.startswith("s3://"):
        if not S3_URI_RE.match(model_id):
            problems.append(("model.id", f"{model_id!r} is not a valid S3 URI"))
    elif model_id.startswith((".", "/", "~")) or resolve_local(model_id, None) is not None:
        resolved = resolve_local(model_id, base_dir)
        if resolved is None or not (resolved / "config.json").is_file():
            problems.append(("model.id", f"{model_id!r} is not a model directory (no config.json)"))
        else:
            model["id"] = str(resolved)
    elif not re.match(HUB_ID_PATTERN, model_id):
        problems.append(("model.id", f"{model_id!r} is not a hub id (org/name), an s3:// prefix or a local directory"))
    return problems


def resolve_local(value: str, base_dir: Path | None) -> Path | None:
    candidates = [Path(value).expanduser()]
    if base_dir is not None and not Path(value).is_absolute():
        candidates.append(base_dir / value)
    for c in candidates:
        if c.exists():
            return c.resolve()
    return None


def load_config(source: str | Path | dict | JobConfig, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """A path, a dict or a JobConfig -> a validated JobConfig, or ConfigError listing every problem."""
    if isinstance(source, JobConfig) and not overrides:
        return source
    base_dir = None
    if isinstance(source, JobConfig):
        raw = source.model_dump(mode="json", exclude_none=True)
    elif isinstance(source, dict):
        raw = json.loads(json.dumps(source))
    else:
        raw = read_config_file(source)
        base_dir = Path(source).resolve().parent
    for assignment in overrides:
        apply_override(raw, assignment)
    problems = _local_path_problems(raw, base_dir)
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as err:
        problems = _format_errors(err) + problems
    if problems:
        raise ConfigError(problems)
    return cfg
