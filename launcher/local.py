"""Running the job on this machine: the SageMaker container layout under runs/<job>/
and `python -m entrypoint` in a subprocess with the SM_* environment a training
container gets. No Docker, no AWS.

A run has exactly one owner process at a time: the owner holds an exclusive flock on
runs/<job>/.lock for the run's lifetime, and the trainer inherits that lock, so the lock
is free only once both have ended. "Is the run alive?" is "is its lock held?": no pid
files, no pid reuse. A run whose lock is free while job.json still says InProgress lost
its owner (killed, or a disk full at the end); its outcome is read from its log.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from entrypoint import container as ct
from entrypoint.hyperparams import Strategy, flatten
from entrypoint.progress import Progress
from launcher.channels import input_channels
from launcher.config import JobConfig, is_job_name
from launcher.errors import ConfigError, JobFailed
from launcher.logs import FileSource, read_complete_lines, record_growth
from launcher.plan import micro_batch_rows
from launcher.plot import write_loss_png

HOST = "algo-1"
TRAINER = ("-m", "entrypoint")  # what the owner runs under sys.executable (torchrun for ddp)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each one: checkpoint and stop


TRAIN_MODULES = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "safetensors")


def missing_train_modules() -> list[str]:
    """What of the `[train]` extra this Python cannot import (found, not imported: torch
    takes seconds to load, and the trainer imports it in its own process)."""
    import importlib.util

    return [m for m in TRAIN_MODULES if importlib.util.find_spec(m) is None]


def runs_dir() -> Path:
    return Path(os.environ.get(ct.RUNS_DIR, "runs")).resolve()


def run_dir(name: str) -> Path:
    """runs/<name>/ for a job name; anything that is not a plain job name is refused, so
    a run never lives outside the runs directory."""
    if not is_job_name(name):
        raise ConfigError([("--resume", f"{name!r} is not a local run's name (a job name like "
                            f"tiny-test-20261129-101500, no '/' or '..'); local runs live under {runs_dir()}")])
    return runs_dir() / name


# --------------------------------------------------------------------------- job.json and the lock

def read_state(root: Path) -> dict:
    path = root / "job.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(root: Path, **changes) -> dict:
    state = read_state(root) | changes
    tmp = root / f"job.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(root / "job.json")
    return state


def lock(root: Path) -> int | None:
    """Take the run's lock; its fd, or None when another process owns the run."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_alive(root: Path) -> bool:
    fd = lock(root) if (root / ".lock").exists() else -1
    if fd is None:
        return True
    if fd >= 0:
        os.close(fd)
    return False


# --------------------------------------------------------------------------- laying out a run

def claim(cfg: JobConfig, name: str, resume: bool, warn: Callable[[str], None]) -> tuple[Path, int]:
    """The run's directory and its lock: a new one, or one to resume that is neither
    alive nor Completed."""
    if not resume:
        root = new_run_dir(name)
        return root, lock(root)
    root = run_dir(name)
    if not (root / "checkpoints").is_dir():
        raise ConfigError([("--resume", f"no local run {name!r} under {runs_dir()} to resume")])
    fd = lock(root)
    if fd is None:
        raise ConfigError([("--resume", f"local run {name} is still running; one process owns a run at a time")],
                          f"follow it: sm-qlora logs {name} --follow   stop it: sm-qlora stop {name}")
    state = read_state(root)
    if state.get("status") == "Completed":
        os.close(fd)
        raise ConfigError([("--resume", f"local run {name} has Completed; its adapter is in {root / 'model'}")],
                          "launch without --resume to train a new run")
    if state.get("config_sha256") and state["config_sha256"] != cfg.digest():
        warn(f"warning: {name} was started with config {state['config_sha256']}; this config is {cfg.digest()}. "
             "The run continues from its checkpoint with this config.")
    return root, fd


def new_run_dir(name: str) -> Path:
    """runs/<name>/, or runs/<name>-2/, -3, ... when launches in the same second took the
    name: mkdir is atomic, so two processes never get one directory and none has to retry."""
    runs_dir().mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        suffix = "" if n == 1 else f"-{n}"
        candidate = name[: 63 - len(suffix)].rstrip("-") + suffix
        root = run_dir(candidate)
        try:
            root.mkdir()
        except FileExistsError:
            continue
        return root
    raise ConfigError([("job_name", f"999 local runs named {name} exist already under {runs_dir()}")])


def gpu_count() -> int:
    """The GPUs a job here gets, counted as the training toolkit counts them (nvidia-smi),
    within CUDA_VISIBLE_DEVICES when it is set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() not in ("", "-1")])
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        listed = subprocess.run([exe, "--list-gpus"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def strategy_here(cfg: JobConfig, gpus: int) -> Strategy:
    """compute.strategy when the config forces one, else as on SageMaker: one process per
    GPU (ddp) where there are several, one process otherwise."""
    if cfg.compute.strategy != "auto":
        return cfg.compute.strategy
    return "ddp" if gpus > 1 else "single"


def trainer_command(strategy: Strategy, gpus: int) -> list[str]:
    """As the toolkit starts the job: torchrun, one process per GPU, for ddp on several GPUs;
    the entrypoint alone otherwise (model_parallel spreads one process over the GPUs)."""
    if strategy == "ddp" and gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *TRAINER]
    return [sys.executable, *TRAINER]


def lay_out(cfg: JobConfig, name: str, strategy: Strategy = "single") -> tuple[Path, dict[str, str]]:
    """Fill runs/<name>/ as /opt/ml looks inside a job; return it and the environment."""
    root = runs_dir() / name
    for sub in ("input/config", "input/data", "model", "checkpoints", "output"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    hp = cfg.hyperparameters(strategy=strategy, rows=micro_batch_rows(cfg, None))
    channels = {}
    for channel in input_channels(hp):
        if not channel.is_local:
            continue  # no AWS here: the job reads what it can from the URI itself
        dest = root / "input" / "data" / channel.name
        if channel.name == "model":  # a directory of weights: linked, not copied
            if not dest.exists():
                dest.symlink_to(Path(channel.source).resolve(), target_is_directory=True)
        else:
            dest.mkdir(exist_ok=True)
            shutil.copy2(channel.source, dest / Path(channel.source).name)
        channels[channel.name] = str(dest)
    encoded = {k: json.dumps(v) for k, v in flatten(hp).items()}  # as the Estimator writes them
    _write(root / "input" / "config" / "hyperparameters.json", json.dumps(encoded, indent=2))
    _write(root / "input" / "config" / "resourceconfig.json", json.dumps({"current_host": HOST, "hosts": [HOST]}))
    env = {
        ct.MODEL_DIR: str(root / "model"),
        ct.OUTPUT_DIR: str(root / "output"),
        ct.OUTPUT_DATA_DIR: str(root / "output" / "data"),
        ct.INPUT_DIR: str(root / "input"),
        ct.INPUT_CONFIG_DIR: str(root / "input" / "config"),
        ct.CHANNELS: json.dumps(sorted(channels)),
        ct.HOSTS: json.dumps([HOST]),
        ct.CURRENT_HOST: HOST,
        ct.CHECKPOINT_DIR: str(root / "checkpoints"),
        ct.JOB_NAME: name,
        "PYTHONUNBUFFERED": "1",
    }
    for channel, path in channels.items():
        env[ct.channel_env(channel)] = path
    if cfg.aws.hf_token_env:
        env[ct.HF_TOKEN_ENV] = cfg.aws.hf_token_env
    if cfg.aws.hf_token_secret:
        env[ct.HF_TOKEN_SECRET] = cfg.aws.hf_token_secret
    return root, env


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.replace(path)


def start(cfg: JobConfig, name: str, resume: bool, lock_fd: int) -> tuple[Path, subprocess.Popen]:
    gpus = gpu_count()
    strategy = strategy_here(cfg, gpus)
    root, sm_env = lay_out(cfg, name, strategy)
    package_root = Path(__file__).resolve().parent.parent
    env = os.environ | sm_env
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")]))
    now = time.time()
    write_state(root, name=name, status="InProgress", pid=None, config_sha256=cfg.digest(),
                started=read_state(root).get("started", now) if resume else now, resumed_at=now if resume else None,
                ended=None, exit_code=None, failure_reason=None, base_job_name=cfg.job_name)
    with (root / "output" / "job.log").open("ab") as log:
        proc = subprocess.Popen(  # the trainer inherits the lock: the run is alive while either lives
            trainer_command(strategy, gpus), cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, pass_fds=(lock_fd,))
    try:
        write_state(root, pid=proc.pid)
    except OSError:
        proc.kill()  # a trainer that `stop` could not find must not run on
        proc.wait()
        raise
    return root, proc


# --------------------------------------------------------------------------- the outcome

def _read_log(root: Path) -> tuple[Progress, bool]:
    progress, stopped = Progress(), False
    for line in FileSource(root / "output" / "job.log").tail(limit=10**9):
        ev = progress.update(line.message)
        stopped = stopped or (ev is not None and ev.kind == "stopped")
    return progress, stopped


def outcome(progress: Progress, stopped: bool, returncode: int | None) -> tuple[str, str | None]:
    """Status and reason from the exit code and the log; with no exit code (the owner is
    gone) from the log alone."""
    if returncode == 0 or (returncode is None and progress.done):
        return "Completed", None
    if returncode in (ct.EXIT_STOPPED, -signal.SIGTERM, 130, -signal.SIGINT) or (returncode is None and stopped):
        return "Stopped", "stopped by a signal; resume with --resume"
    if returncode is None:
        return "Failed", progress.error or "the run's owner process ended before the run did"
    return "Failed", progress.error or f"entrypoint exited with code {returncode}"


def finish(root: Path, returncode: int | None) -> dict:
    """Record the outcome in job.json, then draw the loss curve (which may fail harmlessly)."""
    progress, stopped = _read_log(root)
    status, reason = outcome(progress, stopped, returncode)
    state = write_state(root, status=status, ended=time.time(), exit_code=returncode, failure_reason=reason)
    if progress.train_loss or progress.eval_loss:

        try:
            write_loss_png(progress, root / "loss.png", root.name)
        except OSError:
            pass  # job.json already says how the run ended; `sm-qlora plot` redraws it
    return state


def settle(root: Path) -> dict:
    """job.json, with the outcome recorded if the run's owner died without recording it."""
    state = read_state(root)
    if state.get("status") != "InProgress":
        return state
    fd = lock(root)
    if fd is None:
        return state  # alive
    try:
        state = read_state(root)
        if state.get("status") != "InProgress":
            return state
        try:
            return finish(root, None)
        except OSError:  # still no space: say how it ended without recording it
            status, reason = outcome(*_read_log(root), None)
            return state | {"status": status, "failure_reason": reason}
    finally:
        os.close(fd)


def stop(root: Path) -> bool:
    """SIGTERM the running trainer (it checkpoints, then exits). False if not running."""
    state = read_state(root)
    pid = state.get("pid")
    if state.get("status") != "InProgress" or not pid or not is_alive(root):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- the Job backend

class LocalBackend:
    """A `Job` backend over runs/<name>/: job.json in DescribeTrainingJob's field names."""

    local = True
    region = None

    def __init__(self, name: str, root: Path):
        self.name = name
        self.root = root

    def describe(self) -> dict:
        state = settle(self.root)
        return {
            "TrainingJobName": self.name,
            "TrainingJobStatus": state.get("status", "Unknown"),
            "SecondaryStatus": {"InProgress": "Training"}.get(state.get("status"), state.get("status")),
            "FailureReason": state.get("failure_reason"),
            "TrainingStartTime": state.get("started"),
            "TrainingEndTime": state.get("ended"),
            "ModelArtifacts": {"S3ModelArtifacts": str(self.root / "model")},
        }

    def stop(self) -> bool:
        return stop(self.root)

    def log_source(self) -> FileSource:
        return FileSource(self.root / "output" / "job.log")

    def adapter_uri(self, desc: dict | None) -> str:
        return str(self.root / "model")

    def artifacts(self, adapter_uri: str) -> list[tuple[str, Callable[[Path], None]]]:
        model = Path(adapter_uri)
        return [(str(f.relative_to(model)), lambda target, f=f: shutil.copy2(f, target))
                for f in sorted(model.rglob("*")) if f.is_file()]

    def default_plot_path(self) -> Path:
        return self.root / "loss.png"

    def console_url(self) -> None:
        return None


# --------------------------------------------------------------------------- the owner

def run(cfg: JobConfig, name: str, resume: bool, echo: bool,
        warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> tuple[Path, dict, list]:
    """Own the run from start to recorded end: take its lock, start the trainer, forward
    Ctrl-C, SIGTERM and SIGHUP to it as SIGTERM (it checkpoints and stops), echo its log,
    record the outcome. Returns the run dir, its final state and the signals received."""
    try:
        root, fd = claim(cfg, name, resume, warn)
    except OSError as exc:
        raise JobFailed(f"local run {name}: could not create its directory: {_oserror(exc)}", _space_hint()) from None
    received: list[int] = []
    name = root.name
    try:
        try:
            root, proc = start(cfg, name, resume, fd)
        except OSError as exc:
            _record_failure(root, f"could not lay the run out: {_oserror(exc)}")
            raise JobFailed(f"local run {name}: could not lay the run out: {_oserror(exc)}", _space_hint()) from None

        def forward(signum, frame):
            received.append(signum)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

        previous = {s: signal.signal(s, forward) for s in FORWARDED}
        try:
            _wait(proc, root / "output" / "job.log", echo, resume, received)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        try:
            state = finish(root, proc.returncode)
        except OSError as exc:
            raise JobFailed(f"local run {name} ended (exit {proc.returncode}) but its state could not be "
                            f"recorded: {_oserror(exc)}", _space_hint()) from None
    finally:
        os.close(fd)
    return root, state, received


def _wait(proc: subprocess.Popen, log: Path, echo: bool, resume: bool, received: list[int]) -> None:
    offset = log.stat().st_size if resume and log.exists() else 0
    size = offset
    while True:
        code = proc.poll()
        size = record_growth(log, size)  # when each line was written: `logs` shows that time
        if echo and signal.SIGHUP not in received:  # after a hang-up there is no terminal to print to
            lines, offset = read_complete_lines(log, offset)
            try:
                for line in lines:
                    print(line, flush=True)
            except OSError:
                echo = False
        if code is not None:
            return
        time.sleep(0.2)


def _record_failure(root: Path, reason: str) -> None:
    try:
        write_state(root, status="Failed", ended=time.time(), failure_reason=reason)
    except OSError:
        pass  # the disk is full: the lock is released below, so `status` reads the run as ended


def _oserror(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{':' if where else ''}{where}"


def _space_hint() -> str:
    return f"free space under {runs_dir()} (or set {ct.RUNS_DIR}) and launch again"


__all__ = ["run", "runs_dir", "run_dir", "read_state", "settle", "stop"]
