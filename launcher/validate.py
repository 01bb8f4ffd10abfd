"""The rules that depend on how a valid config is launched (on SageMaker or here, resumed
or not). `sm-qlora validate` and `launch_job` both call `validate_for_launch`, so what one
accepts the other accepts. Nothing here reaches the network."""

from __future__ import annotations

from launcher.config import JobConfig, is_job_name
from launcher.errors import ConfigError
from launcher.images import model_problem, resolve
from launcher.plan import budget_problem, fit_problem
from launcher.shapes import resolve as model_shape


def launch_problems(cfg: JobConfig, *, local: bool = False, resume: str | None = None) -> list[tuple[str, str]]:
    problems = []
    if not local:
        if cfg.aws.hf_token_env:
            problems.append(("aws.hf_token_env", "is for local runs; a SageMaker job reads the token from "
                             "aws.hf_token_secret (a Secrets Manager ARN), so it never shows in DescribeTrainingJob"))
        shape = model_shape(cfg.model.id, network=False)  # None: not local nor built in, not checked here
        image = model_problem(resolve(cfg.compute.image), shape.model_type, shape.experts > 1) \
            if shape is not None and not cfg.compute.image_uri else None
        if image:
            problems.append(("compute.image", image))
        fit = fit_problem(cfg)  # on this machine the instance type is not used
        if fit:
            problems.append(fit)
        elif budget := budget_problem(cfg):
            problems.append(budget)
    if resume is not None and not is_job_name(resume):
        what = "a local run's name (runs/<name>/)" if local else "a SageMaker training job name"
        problems.append(("--resume", f"{resume!r} is not {what}: letters, digits and hyphens, at most 63"))
    return problems


def validate_for_launch(cfg: JobConfig, *, local: bool = False, resume: str | None = None) -> JobConfig:
    """ConfigError listing every launch-time problem, else the config unchanged."""
    problems = launch_problems(cfg, local=local, resume=resume)
    if problems:
        raise ConfigError(problems)
    return cfg
