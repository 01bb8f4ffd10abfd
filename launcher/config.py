"""The job config: one YAML (or JSON) file, validated in one pass by one model.

`JobConfig` IS the job's `Hyperparameters` (the entrypoint's Pydantic model, so every rule
the job applies on arrival also runs here) plus the launcher's sections: job_name, compute,
output, aws. Rules that need a launch mode (SageMaker or local) live in
`launcher.validate.validate_for_launch`, which `validate` and `launch` both call.

Relative paths in a config file (data files, a local model directory) are read from the
config file's directory, never from the working directory, so a config means the same
thing wherever it is run from. A dict config has no file: its paths are taken from the
working directory.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import itertools
import json
import os
import re
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from entrypoint.hyperparams import HUB_ID_PATTERN, Hyperparameters, StrategyChoice, Strict
from launcher.datafiles import DATA_SUFFIXES, column_problems
from launcher.errors import ConfigError
from launcher.images import resolve as resolve_image
from launcher.instances import catalog

# The unique suffix a launch adds to job_name; SageMaker's TrainingJobName is at most 63.
JOB_NAME_SUFFIX_FORMAT = "%Y%m%d-%H%M%S"
JOB_NAME_SUFFIX_LEN = 1 + len(time.strftime(JOB_NAME_SUFFIX_FORMAT, time.gmtime(0)))  # "-" + timestamp
JOB_NAME_MAX = 63 - JOB_NAME_SUFFIX_LEN
HUB_NAME_MAX = 96  # the hub's limit on a repo name (huggingface_hub's validate_repo_id)
JOB_NAME_RE = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*")  # always fullmatch: `$` would pass "x\n"


def is_job_name(name: str) -> bool:
    """SageMaker's TrainingJobName rule: letters, digits and hyphens, at most 63."""
    return len(name) <= 63 and JOB_NAME_RE.fullmatch(name) is not None
PARTITIONS = ("aws", "aws-cn", "aws-us-gov")
_P = "|".join(PARTITIONS)
S3_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
ROLE_ARN_RE = re.compile(rf"arn:({_P}):iam::\d{{12}}:role/[\w+=,.@/-]{{1,512}}")
SECRET_ARN_RE = re.compile(rf"arn:({_P}):secretsmanager:[a-z0-9-]+:\d{{12}}:secret:[\w/+=.@-]+")
REGION_RE = re.compile(r"[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# SageMaker allows 50 tags on a job; the launcher adds up to 4 of its own (submit.py).
MAX_USER_TAGS = 46

# "auto" or one of the job's strategies: the same Literal the hyperparameters use.


def job_name_for(base: str, now: float | None = None) -> str:
    """The unique SageMaker job name (and local run name) for a launch of `base`."""
    return f"{base}-{time.strftime(JOB_NAME_SUFFIX_FORMAT, time.gmtime(now))}"


def s3_uri_problem(uri: str) -> str | None:
    """Why `uri` is not an S3 location the launcher will use, or None."""
    bucket, _, key = uri[len("s3://"):].partition("/") if uri.startswith("s3://") else ("", "", "")
    if not uri.startswith("s3://") or not S3_BUCKET_RE.fullmatch(bucket):
        return f"{uri!r} is not an S3 URI like s3://my-bucket/qlora"
    if re.search(r"[\s\x00-\x1f\x7f]", uri):
        return f"{uri!r} has a space or a control character; S3 keys here must not"
    if {".", ".."} & set(key.rstrip("/").split("/")):
        return f"{uri!r} has a '.' or '..' segment; name the prefix itself"
    return None


@lru_cache(maxsize=1)
def sagemaker_regions() -> dict[str, str]:
    """Region -> partition, for every region where botocore (installed with boto3) knows a
    SageMaker endpoint. Read from botocore's data file so that validating never imports it."""
    spec = importlib.util.find_spec("botocore")
    if spec is None or spec.origin is None:
        return {}
    data = json.loads((Path(spec.origin).parent / "data" / "endpoints.json").read_text())
    regions = {}
    for part in data["partitions"]:
        if part["partition"] in PARTITIONS:
            endpoints = part["services"].get("api.sagemaker", {}).get("endpoints", {})
            regions.update({r: part["partition"] for r in endpoints if r in part["regions"]})
    return regions


class ComputeSpec(Strict):
    instance_type: str = "ml.p4d.24xlarge"
    instance_count: int = Field(1, ge=1, le=64)
    spot: bool = False
    max_run_hours: float = Field(24, gt=0, le=672)  # SageMaker's limit is 28 days
    max_wait_hours: float | None = Field(None, gt=0, le=672)
    volume_size_gb: int = Field(200, ge=1, le=16384)
    # the HF training image by name (2.9.0-transformers5.3.0) or stack (transformers5); auto: the
    # newest whose path was measured on a GPU (launcher.images); image_uri overrides it
    image: str = "auto"
    image_uri: str | None = None  # override the pinned HF training image
    # A budget: MaxRuntimeInSeconds becomes this over the on-demand price of the instances,
    # and a plan whose estimate is above it is refused.
    max_cost_usd: float | None = Field(None, gt=0)
    strategy: StrategyChoice = "auto"  # auto: the plan decides (launcher.plan.choose_strategy)

    @field_validator("image")
    @classmethod
    def _known_image(cls, v: str) -> str:
        resolve_image(v)  # ValueError naming the choices
        return v

    @field_validator("instance_type")
    @classmethod
    def _known_instance(cls, v: str) -> str:
        cat = catalog()
        if v not in cat.instances:
            hint = cat.suggest(v)
            tail = f"; did you mean {hint}?" if hint else f"; see `sm-qlora plan` for the {len(cat.instances)} known ones"
            raise ValueError(f"{v!r} is not a SageMaker GPU training instance{tail}")
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
    def _one_instance_strategies(self) -> ComputeSpec:
        if self.strategy == "model_parallel" and self.instance_count > 1:
            raise ValueError("model_parallel spreads one model over one instance's GPUs; use instance_count: 1")
        if self.strategy == "single" and self.instance_count > 1:
            raise ValueError("single trains in one process: each extra instance would repeat the whole job "
                             "(and be paid for); use ddp, or instance_count: 1")
        return self


class OutputSpec(Strict):
    s3_uri: str

    @field_validator("s3_uri")
    @classmethod
    def _s3(cls, v: str) -> str:
        problem = s3_uri_problem(v)
        if problem:
            raise ValueError(problem)
        return v.rstrip("/")


def _partition_problem(arn: str) -> str | None:
    parts = arn.split(":")
    if len(parts) > 1 and parts[0] == "arn" and parts[1] not in PARTITIONS:
        return f"partition {parts[1]!r} is not one of {', '.join(PARTITIONS)}"
    return None


class AwsSpec(Strict):
    region: str = "us-east-1"
    role: str | None = None  # required for SageMaker (launcher.validate); a local run has none
    profile: str | None = None
    hf_token_secret: str | None = None
    # Local runs only: the name of an environment variable that holds the HF token.
    hf_token_env: str | None = None
    tags: dict[str, str] = {}

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        if not REGION_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not an AWS region like us-east-1")
        known = sagemaker_regions()
        if known and v not in known:
            match = difflib.get_close_matches(v, list(known), n=1, cutoff=0.0)[0]
            raise ValueError(f"{v!r} is not a region with SageMaker (per botocore's endpoint data); "
                             f"did you mean {match}?")
        return v

    @field_validator("role")
    @classmethod
    def _role(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        problem = _partition_problem(v)
        if problem:
            raise ValueError(problem)
        if not ROLE_ARN_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not an IAM role ARN like arn:aws:iam::123456789012:role/SageMakerExecutionRole")
        region_partition = sagemaker_regions().get(info.data.get("region", ""))
        if region_partition and v.split(":")[1] != region_partition:
            raise ValueError(f"is in partition {v.split(':')[1]!r} but aws.region {info.data['region']} is in "
                             f"{region_partition!r}")
        return v

    @field_validator("hf_token_secret")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if _partition_problem(v):
            raise ValueError(_partition_problem(v))
        if not SECRET_ARN_RE.fullmatch(v):
            raise ValueError(
                "must be a Secrets Manager ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME); "
                "never put the token itself in the config"
            )
        return v

    @field_validator("hf_token_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not ENV_NAME_RE.fullmatch(v):
            raise ValueError("must be the name of an environment variable, such as HF_TOKEN")
        if v is not None and v.startswith("hf_") and len(v) > 20:
            raise ValueError("looks like a token, not a variable name; never put the token in the config")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        problems = [f"at most {MAX_USER_TAGS} tags (SageMaker allows 50; the launcher adds its own)"] \
            if len(v) > MAX_USER_TAGS else []
        for key, value in v.items():
            if key.lower().startswith("aws:"):
                problems.append(f"{key!r}: the aws: prefix is reserved for AWS")
            if not 1 <= len(key) <= 128:
                problems.append(f"{key[:40]!r}: a tag key is 1 to 128 characters, not {len(key)}")
            if len(value) > 256:
                problems.append(f"{key!r}: a tag value is at most 256 characters, not {len(value)}")
        if problems:
            raise ValueError("; ".join(problems))
        return v


class JobConfig(Hyperparameters):
    """The whole config: the job's hyperparameters (with all their rules) and where it runs."""

    job_name: str
    compute: ComputeSpec = ComputeSpec()
    # Required for SageMaker (launcher.validate.missing_sections); a local run needs neither.
    output: OutputSpec | None = None
    aws: AwsSpec = AwsSpec()
    # The job's strategy is compute.strategy in a config; this inherited field only says so.
    strategy: None = Field(None, exclude=True, repr=False)
    # Where the config's relative paths were read from (digest counts paths from here).
    _base_dir: Path | None = PrivateAttr(None)

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_lives_in_compute(cls, v: Any) -> None:
        raise ValueError("unknown key; did you mean compute.strategy?")

    @field_validator("job_name", mode="before")
    @classmethod
    def _job_name_given(cls, v: Any) -> Any:
        if v is None or v == "":  # `job_name:` or `--set job_name=` (YAML reads both as empty)
            raise ValueError("is empty; name the job, like medical-mixtral (letters, digits and hyphens)")
        return v

    @field_validator("job_name")
    @classmethod
    def _job_name(cls, v: str) -> str:
        if len(v) <= JOB_NAME_MAX and not JOB_NAME_RE.fullmatch(v):
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

    def hyperparameters(self, strategy: str | None = None, rows: int | None = None) -> Hyperparameters:
        """The part the job sees, validated again by the same model (deep copies: submit
        rewrites local paths to S3 URIs in it, never in the config). `rows` resolves
        `per_device_batch_size: auto` (the plan's choice)."""
        training = self.training.model_copy(deep=True)
        if rows is not None and training.per_device_batch_size == "auto":
            training.per_device_batch_size = rows
        return Hyperparameters(
            model=self.model.model_copy(deep=True), data=self.data.model_copy(deep=True),
            lora=self.lora.model_copy(deep=True), training=training,
            strategy=strategy or self.compute.strategy,
        )

    def digest(self) -> str:
        """Short hash of the whole config: tags a job with the config that made it. Local
        paths count as written relative to the config's directory, so a project that is
        moved or cloned elsewhere keeps its hash (a resume there does not warn)."""
        dump = self.model_dump(mode="json")
        for section, key in (("data", "train"), ("data", "validation"), ("model", "id")):
            value = dump[section].get(key)
            if value and "://" not in value and Path(value).is_absolute():
                dump[section][key] = os.path.relpath(value, self._base_dir or Path.cwd())
        blob = json.dumps(dump, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- reading

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the base class says so with its line
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first on line {first})",
                                                    key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> data, or ConfigError naming `where` and the line (never a traceback)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([("", f"{where}:{line} not valid YAML: {problem}")]) from None
    except RecursionError:
        raise ConfigError([("", f"{where}: nested too deeply")]) from None


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("", f"config file {str(path)!r} not found")])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([("", f"{path}: line {line}: not UTF-8 text (byte {data[exc.start]:#04x})")]) from None
    if path.suffix == ".json":
        try:
            raw = json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as exc:
            raise ConfigError([("", f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}")]) from None
        except ValueError as exc:
            raise ConfigError([("", f"{path}: {exc}")]) from None
        except RecursionError:
            raise ConfigError([("", f"{path}: nested too deeply")]) from None
    else:
        raw = parse_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise ConfigError([("", f"{path}: the top level must be a mapping of sections")])
    return raw


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """`--set training.learning_rate=1e-4`: the value is YAML. A mapping value MERGES into
    the section it names (`--set 'training={learning_rate: 1e-4}'` changes one key), because
    replacing would silently reset every other key of that section to its default."""
    key, sep, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError([("--set", f"{assignment!r} is not key.path=value")])
    value = parse_yaml(text, f"--set {key.strip()}") if text.strip() else None
    node = raw
    *parents, leaf = parts
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError([("--set", f"{key.strip()} goes through {part!r}, which is not a section")])
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        _merge(node[leaf], value)
    else:
        node[leaf] = value


# --------------------------------------------------------------------------- errors

def _section(loc: tuple) -> type[BaseModel] | None:
    """The model class that the path `loc` lands in (JobConfig for the top level)."""
    model: type[BaseModel] | None = JobConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        model = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model


def _did_you_mean(loc: tuple) -> str:
    key = str(loc[-1])
    model = _section(loc[:-1])
    fields = [f for f in (model.model_fields if model else []) if not (model is JobConfig and f == "strategy")]
    match = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if match:
        return f"unknown key; did you mean {'.'.join(map(str, loc[:-1] + (match[0],)))}?"
    for name in JobConfig.model_fields:  # the right key in the wrong section
        section = _section((name,))
        if section is not None and section is not model and key in section.model_fields:
            return f"unknown key; did you mean {name}.{key}?"
    return f"unknown key; this section's keys: {', '.join(fields)}" if fields else "unknown key"


def _format_errors(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = _did_you_mean(loc)
        elif e["type"] == "missing":
            msg = "required, missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        problems.append((".".join(str(p) for p in loc), msg))
    return problems


# --------------------------------------------------------------------------- local files

def resolve_local(value: str, base_dir: Path | None) -> Path | None:
    """An existing local path, read from `base_dir` (the config file's directory) when it
    is relative, or from the working directory for a config given as a dict."""
    try:
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        return path.resolve() if path.exists() else None
    except (OSError, RuntimeError, ValueError):  # a name too long, ~an-unknown-user, a NUL byte
        return None


def _not_found(field: str, value: str, base_dir: Path | None, what: str) -> tuple[str, str]:
    where = (f"in {base_dir} (relative paths are read from the config file's directory)" if base_dir
             else f"in the working directory {Path.cwd()}")
    msg = f"{what} {value!r} not found {where}"
    try:
        parent = (base_dir or Path.cwd()) / Path(value).expanduser().parent
        from_cwd = Path.cwd() / Path(value).expanduser()
        if base_dir is not None and from_cwd.exists():
            msg += f"; from the config file it is {os.path.relpath(from_cwd, base_dir)!r}"
        elif parent.is_dir():
            names = [p.name for p in itertools.islice(parent.iterdir(), 1000)]
            match = difflib.get_close_matches(Path(value).name, names, n=1, cutoff=0.6)
            if match:
                msg += f"; did you mean {str(Path(value).parent / match[0])!r}?"
    except (OSError, RuntimeError, ValueError):  # no hint for a name the system refuses
        pass
    return field, msg


def _looks_like_path(value: str, base_dir: Path | None) -> bool:
    """A hub id is `org/name`; anything else with a path's shape, or whose first part is a
    local directory, is a local model directory (a typo must not become a hub lookup)."""
    if value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value or value.endswith("/"):
        return True
    return resolve_local(value.split("/")[0], base_dir) is not None if "/" in value else \
        resolve_local(value, base_dir) is not None


def _near_model_dir(value: str, base_dir: Path | None) -> str | None:
    """A local model directory (one with config.json, one or two levels down) whose name
    is a near miss of `value`: then `value` is a typo, not a hub id."""
    root = base_dir or Path.cwd()
    found = []
    try:
        for top in itertools.islice(root.iterdir(), 500):
            if top.is_dir() and not top.name.startswith("."):
                found += [top] + [d for d in itertools.islice(top.iterdir(), 500) if d.is_dir()]
    except OSError:
        return None
    names = [str(d.relative_to(root)) for d in found if (d / "config.json").is_file()]
    match = difflib.get_close_matches(value, names, n=1, cutoff=0.85)
    return match[0] if match else None


def _location_problems(raw: dict[str, Any], base_dir: Path | None) -> list[tuple[str, str]]:
    """Local data files and model directories must exist, S3 locations must be usable;
    found local paths are made absolute in `raw`."""
    problems = []
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for field in ("train", "validation"):
        value = data.get(field)
        if not isinstance(value, str) or not value:
            continue
        if value.startswith("s3://"):
            problem = s3_uri_problem(value)
            problems += [(f"data.{field}", problem)] if problem else []
            continue
        if "://" in value:
            continue
        resolved = resolve_local(value, base_dir)
        if resolved is None:
            problems.append(_not_found(f"data.{field}", value, base_dir, "file"))
        elif resolved.is_dir():
            problems.append((f"data.{field}", f"{value!r} is a directory; name the data file"))
        elif resolved.suffix not in DATA_SUFFIXES:
            problems.append((f"data.{field}", f"{value!r} is not a {', '.join(DATA_SUFFIXES)} file"))
        else:
            data[field] = str(resolved)
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    model_id = model.get("id")
    if not isinstance(model_id, str) or not model_id:
        return problems
    if model_id.startswith("s3://"):
        problem = s3_uri_problem(model_id)
        problems += [("model.id", problem)] if problem else []
    elif _looks_like_path(model_id, base_dir):
        resolved = resolve_local(model_id, base_dir)
        if resolved is None:
            problems.append(_not_found("model.id", model_id, base_dir, "model directory"))
        elif not (resolved / "config.json").is_file():
            problems.append(("model.id", f"{model_id!r} is not a model directory (no config.json in {resolved})"))
        else:
            model["id"] = str(resolved)
    elif near := _near_model_dir(model_id, base_dir):
        problems.append(("model.id", f"{model_id!r} is not a local directory; did you mean {near!r}? "
                                     "(as a hub id it would be tried only inside the job)"))
    elif not re.match(HUB_ID_PATTERN, model_id) or any(len(part) > HUB_NAME_MAX for part in model_id.split("/")):
        shown = model_id if len(model_id) <= 80 else f"{model_id[:60]}... ({len(model_id)} characters)"
        problems.append(("model.id", f"{shown!r} is not a hub id (org/name, at most {HUB_NAME_MAX} characters "
                                     "each), an s3:// prefix or a local directory"))
    return problems


def _data_problems(cfg: JobConfig, known: list[tuple[str, str]]) -> list[tuple[str, str]]:
    problems = []
    for field in ("train", "validation"):
        value = getattr(cfg.data, field)
        if value and "://" not in value and f"data.{field}" not in dict(known):
            problems += column_problems(Path(value), cfg.data, field)
    return problems


# --------------------------------------------------------------------------- loading

def load_config(source: str | Path | dict | JobConfig, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """A path, a dict or a JobConfig -> a validated JobConfig, or ConfigError listing every problem."""
    if isinstance(source, JobConfig) and not overrides:
        return source
    try:
        return _load(source, overrides)
    except RecursionError:  # a hand-made deep structure that got past the parsers
        raise ConfigError([("", "the config is nested too deeply")]) from None


def _load(source: str | Path | dict | JobConfig, overrides: list[str] | tuple[str, ...]) -> JobConfig:
    base_dir = None
    if isinstance(source, JobConfig):
        raw = source.model_dump(mode="json", exclude_none=True)
        base_dir = source._base_dir
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        raw = read_config_file(source)
        base_dir = Path(source).resolve().parent
    for assignment in overrides:
        apply_override(raw, assignment)
    problems = _location_problems(raw, base_dir)
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err) + problems) from None
    problems += _data_problems(cfg, problems)
    if problems:
        raise ConfigError(problems)
    cfg._base_dir = base_dir or Path.cwd()
    return cfg
