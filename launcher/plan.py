"""Planning: which parallelism a job uses (the memory model comes with the planner)."""

from __future__ import annotations

from launcher.config import JobConfig


def choose_strategy(cfg: JobConfig) -> str:
    if cfg.compute.strategy != "auto":
        return cfg.compute.strategy
    return "ddp"


def check_fits(cfg: JobConfig) -> None:
    """validate: the configured instance must be able to hold the model (see make_plan)."""
    return None
