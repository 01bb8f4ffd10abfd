"""SageMaker's limits on the CreateTrainingJob request, checked by `validate` before anything
is uploaded: every value the launcher will send is held to botocore's service model for
SageMaker (the file boto3 itself sends with): string lengths and patterns, number ranges,
enums, list and map sizes, and the one rule the model cannot say, that tag keys are unique.
Each problem names the config field the value comes from.

The request itself is built by the SageMaker SDK (launcher/submit.py), whose import costs
seconds; `preview_request` builds the same parameters without it, with made-up content
hashes in the upload keys (they are fixed-width, so lengths are exact), and
tests/launcher/test_api_limits.py holds the preview equal to the real dry run's request.

The model is botocore's data file, the one that `botocore.session.get_session()
.get_service_model("sagemaker")` loads, read as JSON (importing botocore costs `validate`
a second). The checks are written by hand because botocore's ParamValidator checks types
and minimums but no maximums and no patterns. The model's patterns are Java regexes: each is matched whole
(stricter than a search), `.` stops at a line break as in Java, and the tag pattern's
Unicode classes (\\p{L} letters, \\p{Z} separators, \\p{N} numbers) are matched by
Unicode category, which Python's `re` has no spelling for.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from entrypoint import container
from entrypoint.hyperparams import flatten
from entrypoint.progress import METRIC_DEFINITIONS
from launcher import __version__
from launcher.channels import input_channels
from launcher.config import JobConfig, job_name_for
from launcher.container_entry import container_entry_point
from launcher.job_spec import toolkit_hyperparameters

# torchrun SIGKILLs its workers 30 s after it is told to stop; the wrapper signals the
# workers, not torchrun, and this gives any later shutdown of torchrun's the same 120 s
# SageMaker allows (the variable exists in torch >= 2.9; older torch ignores it).
SHUTDOWN_TIMEOUT_ENV = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "110"}
UPLOAD_HASH = "0" * 16  # submit.Uploads names an upload by 16 hex digits of its sha256
TAG_PREFIX = "sm-qlora:"
# A few of the Java classes the model uses, by Unicode category prefix.
UNICODE_CLASSES = {"L": "\ue000", "Z": "\ue001", "N": "\ue002"}


def launcher_tags(cfg: JobConfig, resume: str | None = None) -> list[dict[str, str]]:
    """The tags on every job, the launcher's own first (submit sends these)."""
    tags = [
        {"Key": f"{TAG_PREFIX}config-sha256", "Value": cfg.digest()},
        {"Key": f"{TAG_PREFIX}launcher-version", "Value": __version__},
        {"Key": f"{TAG_PREFIX}base-job-name", "Value": cfg.job_name},
    ] + [{"Key": k, "Value": v} for k, v in sorted(cfg.aws.tags.items())]
    if resume:
        tags.append({"Key": f"{TAG_PREFIX}resumed-from", "Value": resume})
    return tags


def runtime_s(cfg: JobConfig, budget_s: int | None) -> int:
    """MaxRuntimeInSeconds: the budget's (plan.budget_runtime_s), else compute.max_run_hours."""
    return int(budget_s if budget_s is not None else cfg.compute.max_run_hours * 3600)


def max_wait_s(cfg: JobConfig, max_run: int) -> int:
    """A spot job's MaxWait covers the run and the waits for capacity: never below MaxRuntime."""
    c = cfg.compute
    return max(max_run, int((c.max_wait_hours or c.max_run_hours) * 3600))


def job_environment(cfg: JobConfig, max_run: int) -> dict[str, str]:
    env = {container.LAUNCHER_VERSION: __version__, "PYTHONUNBUFFERED": "1", **SHUTDOWN_TIMEOUT_ENV}
    if cfg.aws.hf_token_secret:
        env[container.HF_TOKEN_SECRET] = cfg.aws.hf_token_secret  # the ARN, not the token
    # SageMaker stops the job at MaxRuntime; the job plans its own end inside it (a last
    # checkpoint and the adapter), so it never ends with nothing to show.
    env[container.MAX_RUNTIME_S] = str(max_run)
    return env


def preview_request(cfg: JobConfig, strategy: str, rows: int, budget_s: int | None = None,
                    resume: str | None = None) -> tuple[dict, dict[str, str]]:
    """(the CreateTrainingJob parameters submit will send, the config field behind each
    request path that a config sets). Secrets are the ARN, as sent; nothing is redacted."""
    c, out = cfg.compute, cfg.output.s3_uri
    name = job_name_for(cfg.job_name)
    origin = {"TrainingJobName": "job_name", "RoleArn": "aws.role", "ResourceConfig.InstanceType": "compute.instance_type",
              "ResourceConfig.InstanceCount": "compute.instance_count",
              "ResourceConfig.VolumeSizeInGB": "compute.volume_size_gb",
              "StoppingCondition.MaxRuntimeInSeconds": "compute.max_cost_usd" if budget_s else "compute.max_run_hours",
              "StoppingCondition.MaxWaitTimeInSeconds": "compute.max_wait_hours",
              "AlgorithmSpecification.TrainingImage": "compute.image_uri",
              "OutputDataConfig.S3OutputPath": "output.s3_uri", "CheckpointConfig.S3Uri": "output.s3_uri",
              "Environment": "aws.hf_token_secret"}
    hp = cfg.hyperparameters(strategy, rows=rows)
    inputs = _inputs(hp, out, origin)
    hyper = _hyperparameters(cfg, hp, name, strategy, origin)
    max_run = runtime_s(cfg, budget_s)
    env = job_environment(cfg, max_run)
    tags = launcher_tags(cfg, resume)
    for i, tag in enumerate(tags):
        origin[f"Tags[{i}]"] = (f"aws.tags.{tag['Key']}" if not tag["Key"].startswith(TAG_PREFIX) or
                                tag["Key"] in cfg.aws.tags else
                                "--resume" if tag["Key"].endswith("resumed-from") else "job_name")
    stopping = {"MaxRuntimeInSeconds": max_run}
    if c.spot:
        stopping["MaxWaitTimeInSeconds"] = max_wait_s(cfg, max_run)
    request = {
        "AlgorithmSpecification": {"TrainingInputMode": "File", "ContainerEntrypoint": container_entry_point(
            container.ENTRY_SCRIPT), "MetricDefinitions": METRIC_DEFINITIONS, "EnableSageMakerMetricsTimeSeries": True}
        | ({"TrainingImage": c.image_uri} if c.image_uri else {}),
        "OutputDataConfig": {"S3OutputPath": f"{out}/jobs", "CompressionType": "NONE"},
        "TrainingJobName": name, "StoppingCondition": stopping,
        "ResourceConfig": {"VolumeSizeInGB": c.volume_size_gb, "InstanceCount": c.instance_count,
                           "InstanceType": c.instance_type},
        "RoleArn": cfg.aws.role, "HyperParameters": hyper, "Environment": env, "Tags": tags,
        "CheckpointConfig": {"S3Uri": f"{out}/checkpoints/{resume or name}", "LocalPath": str(container.CHECKPOINT_PATH)},
        "ProfilerConfig": {"DisableProfiler": True},
    }
    if inputs:
        request["InputDataConfig"] = inputs
    if c.spot:
        request["EnableManagedSpotTraining"] = True
    return request, origin


def _inputs(hp, out: str, origin: dict[str, str]) -> list[dict]:
    """InputDataConfig; local inputs become their upload's URI in `hp`, as submit does."""
    inputs = []
    for channel in input_channels(hp):
        uri = channel.source if not channel.is_local else f"{out}/uploads/{UPLOAD_HASH}/{Path(channel.source).name}"
        origin[f"InputDataConfig[{len(inputs)}]"] = channel.field if not channel.is_local else "output.s3_uri"
        section, key = channel.field.split(".")
        setattr(getattr(hp, section), key, uri)
        inputs.append({"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                                        "S3DataDistributionType": "FullyReplicated"}},
                       "ChannelName": channel.name})
    return inputs


def _hyperparameters(cfg: JobConfig, hp, name: str, strategy: str, origin: dict[str, str]) -> dict[str, str]:
    """The job's hyperparameters and those SDK v2 adds, each JSON-encoded as the SDK sends them."""
    hyper = toolkit_hyperparameters(
        flatten(hp), source_dir=f"{cfg.output.s3_uri}/uploads/{UPLOAD_HASH}/sourcedir.tar.gz",
        entry_script=container.ENTRY_SCRIPT, name=name, region=cfg.aws.region,
        instance_type=cfg.compute.instance_type, distributed=strategy == "ddp")
    origin |= {f"HyperParameters[{k!r}]": k for k in flatten(hp)}
    origin |= {"HyperParameters['sagemaker_submit_directory']": "output.s3_uri",
               "HyperParameters['sagemaker_job_name']": "job_name"}
    return hyper


# --------------------------------------------------------------------------- the model

@functools.cache
def _shapes() -> dict[str, dict]:
    """botocore's SageMaker model (the newest API version it holds), read as the data file
    it is: `validate` never imports botocore (that costs a second; tests/launcher/test_cli.py)."""
    spec = importlib.util.find_spec("botocore")
    if spec is None or spec.origin is None:
        return {}
    root = Path(spec.origin).parent / "data" / "sagemaker"
    newest = max(root.iterdir(), key=lambda p: p.name)
    path = next(p for p in (newest / "service-2.json.gz", newest / "service-2.json") if p.is_file())
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(raw)["shapes"]


def _shape(ref: dict) -> dict:
    return _shapes()[ref["shape"]]


@functools.cache
def _pattern(java: str) -> re.Pattern:
    for cls, placeholder in UNICODE_CLASSES.items():
        java = java.replace(rf"\p{{{cls}}}", placeholder)
    return re.compile(java)  # no DOTALL: Java's `.` stops at a line break too


def _in_pattern(pattern: str, value: str) -> bool:
    if r"\p{" in pattern:  # letters, separators and numbers become their class's placeholder
        value = "".join(UNICODE_CLASSES.get(unicodedata.category(ch)[0], ch) for ch in value)
    return _pattern(pattern).fullmatch(value) is not None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]} ({len(value)} characters)"


def _scalar_problem(shape: dict, value: Any) -> str | None:
    if isinstance(value, str):
        lo, hi = shape.get("min", 0), shape.get("max")
        if len(value) < lo or (hi is not None and len(value) > hi):  # before the pattern: a 5 MB value stops here
            return f"is {len(value)} characters; SageMaker takes {lo} to {hi}" if hi is not None else \
                f"is {len(value)} characters; SageMaker takes at least {lo}"
        if shape.get("enum") and value not in shape["enum"]:
            return f"{_short(value)} is not one SageMaker knows ({len(shape['enum'])} values in botocore's model)"
        if shape.get("pattern") and not _in_pattern(shape["pattern"], value):
            return f"{_short(value)} does not match SageMaker's pattern {shape['pattern']}"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = shape.get("min"), shape.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"{value} is outside SageMaker's range {lo if lo is not None else ''}..{hi if hi is not None else ''}"
    return None


def violations(params: dict) -> list[tuple[str, str]]:
    """Each (request path, problem) where `params` breaks botocore's model of CreateTrainingJob;
    [] without botocore (boto3 brings it, so only a broken install)."""
    shapes = _shapes()
    if not shapes:
        return []
    found: list[tuple[str, str]] = []
    _walk(shapes["CreateTrainingJobRequest"], params, "", found)
    return found


def _walk(shape: dict, value: Any, path: str, found: list[tuple[str, str]]) -> None:
    kind = shape["type"]
    if kind == "structure":
        for name, member in value.items():
            if name in shape["members"]:
                _walk(_shape(shape["members"][name]), member, f"{path}.{name}" if path else name, found)
            else:
                found.append((path, f"{name} is not in botocore's model of the request"))
        return
    if kind in ("list", "map"):
        lo, hi = shape.get("min", 0), shape.get("max")
        if len(value) < lo or (hi is not None and len(value) > hi):
            found.append((path, f"has {len(value)} entries; SageMaker takes {lo} to {hi}"))
        items = enumerate(value) if kind == "list" else value.items()
        for key, item in items:
            where = f"{path}[{key!r}]" if kind == "map" else f"{path}[{key}]"
            if kind == "map" and (problem := _scalar_problem(_shape(shape["key"]), key)):
                found.append((where, f"the name {problem}"))
            _walk(_shape(shape["member"] if kind == "list" else shape["value"]), item, where, found)
        return
    if problem := _scalar_problem(shape, value):
        found.append((path, problem))


def duplicate_tags(tags: list[dict[str, str]]) -> list[tuple[str, str]]:
    """SageMaker refuses a request that gives one tag key twice (keys are case-sensitive)."""
    first: dict[str, int] = {}
    found = []
    for i, tag in enumerate(tags):
        if tag["Key"] in first:
            found.append((f"Tags[{i}]", f"tag key {tag['Key']!r} is given twice"
                          + (" (the launcher sets it itself)" if tag["Key"].startswith(TAG_PREFIX) else "")))
        first.setdefault(tag["Key"], i)
    return found


# --------------------------------------------------------------------------- as config problems

FIXES = {
    "job_name": "letters, digits and hyphens, at most 47 (the launcher adds a 16-character timestamp)",
    "aws.tags": f"keys 1-128 and values up to 256 characters of letters, digits, spaces and _ . : / = + - @; "
                f"the {TAG_PREFIX} prefix is the launcher's own",
    "data.system_prompt": "SageMaker takes at most 2500 characters per hyperparameter (JSON-encoded, a non-ASCII "
                          "character as \\uXXXX); put a long system prompt in the data (data.columns.system)",
    "output.s3_uri": "use a shorter S3 prefix",
    "compute.max_run_hours": "SageMaker's MaxRuntimeInSeconds is a whole number of seconds, at least 1",
}
HYPERPARAMETER_FIX = "SageMaker takes at most 2500 characters per hyperparameter value (JSON-encoded); shorten it"


def _field_of(path: str, origin: dict[str, str]) -> str:
    best = max((p for p in origin if path == p or path.startswith((p + ".", p + "["))), key=len, default=None)
    return origin[best] if best else f"(the request's {path})"


def request_problems(request: dict, origin: dict[str, str]) -> list[tuple[str, str]]:
    """The request's violations as (config field, problem and fix), one per field."""
    problems: dict[str, str] = {}
    for path, problem in violations(request) + duplicate_tags(request.get("Tags", [])):
        field = _field_of(path, origin)
        section = field.split(".")[0] + "." + field.split(".")[1] if field.startswith("aws.tags.") else field
        fix = FIXES.get(section) or (HYPERPARAMETER_FIX if path.startswith("HyperParameters[") else None)
        where = "" if path == field else f" (CreateTrainingJob {path})"
        problems.setdefault(field, f"{problem}{where}" + (f"; {fix}" if fix else ""))
    return list(problems.items())
