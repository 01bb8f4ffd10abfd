"""Running the job on this machine: the SageMaker container layout under runs/<job>/
and `python -m entrypoint` in a subprocess with the SM_* environment a training
container gets. No Docker, no AWS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from entrypoint.hyperparams import flatten
from launcher.config import JobConfig
from launcher.errors import ConfigError

HOST = "algo-1"


def runs_dir() -> Path:
    return Path(os.environ.get("SM_QLORA_RUNS_DIR", "runs")).resolve()


def read_state(root: Path) -> dict:
    path = root / "job.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(root: Path, **changes) -> dict:
    state = read_state(root) | changes
    tmp = root / "job.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(root / "job.json")
    return state


def lay_out(cfg: JobConfig, name: str, resume: bool) -> tuple[Path, dict[str, str]]:
    """Create runs/<name>/ as /opt/ml looks inside a job; return it and the environment."""
    root = runs_dir() / name
    if resume:
        if not (root / "checkpoints").is_dir():
            raise ConfigError([("--resume", f"no local run {name!r} under {runs_dir()} to resume")])
    elif root.exists():
        raise ConfigError([("job_name", f"{root} exists already")])
    for sub in ("input/config", "input/data", "model", "checkpoints", "output"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    hp = cfg.hyperparameters(strategy="auto")
    channels = {}
    for channel in ("train", "validation"):
        value = getattr(hp.data, channel)
        if value is None or "://" in value:
            continue
        dest = root / "input" / "data" / channel
        dest.mkdir(exist_ok=True)
        shutil.copy2(value, dest / Path(value).name)
        channels[channel] = str(dest)
    if Path(hp.model.id).is_dir():
        link = root / "input" / "data" / "model"
        if not link.exists():
            link.symlink_to(Path(hp.model.id).resolve(), target_is_directory=True)
        channels["model"] = str(link)
    encoded = {k: json.dumps(v) for k, v in flatten(hp).items()}  # as the Estimator writes them
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(encoded, indent=2))
    (root / "input" / "config" / "resourceconfig.json").write_text(
        json.dumps({"current_host": HOST, "hosts": [HOST]}))
    env = {
        "SM_MODEL_DIR": str(root / "model"),
        "SM_OUTPUT_DIR": str(root / "output"),
        "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
        "SM_INPUT_DIR": str(root / "input"),
        "SM_INPUT_CONFIG_DIR": str(root / "input" / "config"),
        "SM_CHANNELS": json.dumps(sorted(channels)),
        "SM_HOSTS": json.dumps([HOST]),
        "SM_CURRENT_HOST": HOST,
        "SM_QLORA_CHECKPOINT_DIR": str(root / "checkpoints"),
        "SM_QLORA_JOB_NAME": name,
        "PYTHONUNBUFFERED": "1",
    }
    for channel, path in channels.items():
        env[f"SM_CHANNEL_{channel.upper()}"] = path
    if cfg.aws.hf_token_env:
        env["SM_QLORA_HF_TOKEN_ENV"] = cfg.aws.hf_token_env
    if cfg.aws.hf_token_secret:
        env["SM_QLORA_HF_TOKEN_SECRET"] = cfg.aws.hf_token_secret
    return root, env


def start(cfg: JobConfig, name: str, resume: bool) -> tuple[Path, subprocess.Popen]:
    root, sm_env = lay_out(cfg, name, resume)
    package_root = Path(__file__).resolve().parent.parent
    env = os.environ | sm_env
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")]))
    log = (root / "output" / "job.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoint"], cwd=root, env=env,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    now = time.time()
    write_state(root, name=name, status="InProgress", pid=proc.pid, config_sha256=cfg.digest(),
                started=read_state(root).get("started", now) if resume else now, resumed_at=now if resume else None,
                ended=None, exit_code=None, failure_reason=None, base_job_name=cfg.job_name)
    return root, proc


def finish(root: Path, returncode: int) -> dict:
    """Record the outcome; 143 is the entrypoint's exit after a SIGTERM checkpoint."""
    from entrypoint.progress import Progress

    progress = Progress()
    log = root / "output" / "job.log"
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            progress.update(line)
    if returncode == 0:
        status, reason = "Completed", None
    elif returncode in (143, -signal.SIGTERM, 130, -signal.SIGINT):
        status, reason = "Stopped", "stopped by a signal; resume with --resume"
    else:
        status, reason = "Failed", progress.error or f"entrypoint exited with code {returncode}"
    if progress.train_loss or progress.eval_loss:
        from launcher.plot import write_loss_png

        write_loss_png(progress, root / "loss.png", root.name)
    return write_state(root, status=status, ended=time.time(), exit_code=returncode, failure_reason=reason)


def stop(root: Path) -> bool:
    """SIGTERM the running entrypoint (it checkpoints, then exits). False if not running."""
    state = read_state(root)
    pid = state.get("pid")
    if state.get("status") != "InProgress" or not pid:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True
