"""The container contract, said once: the environment names and /opt/ml paths the job
reads, and its exit codes. The launcher (local runner, submit) imports these names
from here, so both sides agree. Standard library only: no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

OPT_ML = Path("/opt/ml")

# Set by SageMaker / the training toolkit inside a job, and by the local runner.
MODEL_DIR = "SM_MODEL_DIR"                # the adapter goes here
OUTPUT_DIR = "SM_OUTPUT_DIR"              # `failure` goes here (SageMaker's FailureReason)
INPUT_CONFIG_DIR = "SM_INPUT_CONFIG_DIR"  # hyperparameters.json
HPS = "SM_HPS"                            # the hyperparameters, decoded (the toolkit sets it)
HOSTS = "SM_HOSTS"
CURRENT_HOST = "SM_CURRENT_HOST"
CHANNELS = "SM_CHANNELS"                  # the input channels, a JSON list
INPUT_DIR = "SM_INPUT_DIR"
OUTPUT_DATA_DIR = "SM_OUTPUT_DATA_DIR"
TRAINING_JOB_NAME = "TRAINING_JOB_NAME"
TRAINING_JOB_ARN = "TRAINING_JOB_ARN"     # its region is the API's the job asks about its own stop

# Ours: set by the launcher (Estimator environment) or the local runner.
JOB_NAME = "SM_QLORA_JOB_NAME"
CHECKPOINT_DIR = "SM_QLORA_CHECKPOINT_DIR"
HF_TOKEN_SECRET = "SM_QLORA_HF_TOKEN_SECRET"  # a Secrets Manager ARN, never the token
HF_TOKEN_ENV = "SM_QLORA_HF_TOKEN_ENV"        # local runs: the name of a variable holding the token
LAUNCHER_VERSION = "SM_QLORA_LAUNCHER_VERSION"
RUNS_DIR = "SM_QLORA_RUNS_DIR"                # where local runs live (default ./runs)
# The job's MaxRuntimeInSeconds: SageMaker kills the job then, so it stops cleanly before.
MAX_RUNTIME_S = "SM_QLORA_MAX_RUNTIME_S"
# How often a job without the wrapper asks whether it is Stopping (entrypoint/stopping.py).
STOP_POLL_S = "SM_QLORA_STOP_POLL_S"

# torchrun sets these for each process.
WORLD_SIZE = "WORLD_SIZE"
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"        # processes on this host (torchrun)


def channel_env(name: str) -> str:
    """SM_CHANNEL_TRAIN etc.: where an input channel was downloaded to."""
    return f"SM_CHANNEL_{name.upper()}"

# The source dir's entry scripts (the toolkit runs `sagemaker_program` of the hyperparameters).
ENTRY_SCRIPT = "sm_qlora_entry.py"   # the training job: entrypoint.train.main
MERGE_SCRIPT = "sm_qlora_merge.py"   # the merge job: entrypoint.merge.main

# Where SageMaker syncs checkpoint_s3_uri to and from (Estimator checkpoint_local_path).
CHECKPOINT_PATH = OPT_ML / "checkpoints"

# SageMaker shows the first 1024 characters of /opt/ml/output/failure as FailureReason.
FAILURE_MAX_CHARS = 1024

EXIT_OK = 0
EXIT_FAILED = 1     # training went wrong (a non-finite loss): the inputs were fine
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 143  # 128 + SIGTERM: checkpointed and stopped; a resume continues from here


def path(env_name: str, default: Path) -> Path:
    """An /opt/ml location: from its variable when set (local runs, tests), else the default."""
    return Path(os.environ.get(env_name) or default)


def model_dir() -> Path:
    return path(MODEL_DIR, OPT_ML / "model")


def output_dir() -> Path:
    return path(OUTPUT_DIR, OPT_ML / "output")


def input_config_dir() -> Path:
    return path(INPUT_CONFIG_DIR, OPT_ML / "input" / "config")


def checkpoint_dir() -> Path:
    return path(CHECKPOINT_DIR, CHECKPOINT_PATH)


def max_runtime_s() -> float | None:
    raw = os.environ.get(MAX_RUNTIME_S)
    return float(raw) if raw else None


def container_started(fallback: float) -> float:
    """When this container's main process (PID 1) started: SageMaker's MaxRuntime clock runs
    from about then, not from when the toolkit got round to starting the job (pip install,
    torchrun). `fallback` (the job's own start) outside a training container, when /proc
    says nothing, or when PID 1 is older than an hour (not a container of this job's)."""
    if not os.environ.get(TRAINING_JOB_NAME):
        return fallback
    try:
        after_name = Path("/proc/1/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(after_name[19])  # field 22, starttime, in clock ticks since boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return fallback
    return started if 0 <= fallback - started <= 3600 else fallback


def readable_by_umask(path: Path) -> None:
    """Give a file the mode a plain open() would (0644 under umask 022): safetensors writes
    its files 0600 through a temporary file of its own, unlike every other file beside them."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
