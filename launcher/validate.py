"""The rules that depend on how a valid config is launched (on SageMaker or here, resumed
or not). `sm-qlora validate` and `launch_job` both call `validate_for_launch`, so what one
accepts the other accepts. Nothing here reaches the network."""

from __future__ import annotations

from launcher.api_limits import preview_request, request_problems
from launcher.config import JobConfig, is_job_name
from launcher.errors import ConfigError
from launcher.images import for_shape
from launcher.images import problems as image_problems
from launcher.instances import catalog
from launcher.plan import (
    budget_problem,
    budget_runtime_s,
    choose_strategy,
    fit_problem,
    micro_batch_rows,
    runtime_floor_problem,
)
from launcher.shapes import resolve as model_shape


def launch_problems(cfg: JobConfig, *, local: bool = False, resume: str | None = None) -> list[tuple[str, str]]:
    problems = local_problems(cfg) if local else sagemaker_problems(cfg, resume)
    if resume is not None and not is_job_name(resume):
        what = "a local run's name (runs/<name>/)" if local else "a SageMaker training job name"
        problems.append(("--resume", f"{resume!r} is not {what}: letters, digits and hyphens, at most 63"))
    return problems


def local_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """A local run sends nothing to AWS, so it cannot read S3 (the job would fail at its start)."""
    values = {"data.train": cfg.data.train, "data.validation": cfg.data.validation, "model.id": cfg.model.id}
    return [(field, f"{value!r}: a local run reads local files, hub ids and hf:// datasets, not S3; copy it "
             "here (aws s3 cp) and name the local path, or launch on SageMaker (without --local)")
            for field, value in values.items() if (value or "").startswith("s3://")]


def missing_sections(cfg: JobConfig) -> list[tuple[str, str]]:
    """A config for local runs may leave out `output` and `aws.role`; a SageMaker job needs them."""
    problems = []
    if cfg.output is None:
        problems.append(("output.s3_uri", "required for a SageMaker job (where adapters, checkpoints and uploads "
                         "go), like s3://my-bucket/qlora; only `launch --local` runs without it"))
    if cfg.aws.role is None:
        problems.append(("aws.role", "required for a SageMaker job: the execution role's ARN, like "
                         "arn:aws:iam::123456789012:role/SageMakerExecutionRole; only `launch --local` runs without it"))
    return problems


def sagemaker_problems(cfg: JobConfig, resume: str | None) -> list[tuple[str, str]]:
    problems = []
    if cfg.aws.hf_token_env:
        problems.append(("aws.hf_token_env", "is for local runs; a SageMaker job reads the token from "
                         "aws.hf_token_secret (a Secrets Manager ARN), so it never shows in DescribeTrainingJob"))
    if missing := missing_sections(cfg):
        return missing + problems
    shape = model_shape(cfg.model.id, network=False)  # None: not local nor built in, not checked here
    if not cfg.compute.image_uri:
        problems += [("compute.image", p) for p in image_problems(for_shape(cfg, shape), cfg, shape)]
    fit, floor = fit_problem(cfg), runtime_floor_problem(cfg)
    problems += [p for p in (fit, floor) if p]
    if not (fit or floor) and (budget := budget_problem(cfg)):
        problems.append(budget)
    rows = micro_batch_rows(cfg, catalog().get(cfg.compute.instance_type))
    request, origin = preview_request(cfg, choose_strategy(cfg), rows, budget_runtime_s(cfg), resume)
    known = {field for field, _ in problems}
    return problems + [p for p in request_problems(request, origin) if p[0] not in known]


def validate_for_launch(cfg: JobConfig, *, local: bool = False, resume: str | None = None) -> JobConfig:
    """ConfigError listing every launch-time problem, else the config unchanged."""
    problems = launch_problems(cfg, local=local, resume=resume)
    if problems:
        raise ConfigError(problems)
    return cfg
