"""The job started the way SageMaker starts it: the launcher submits to moto, /opt/ml is
laid out from the CreateTrainingJob request moto received, and the container's main
process runs, exactly as the request says, as PID 1 of its own PID namespace, through the
real training toolkit (sagemaker-training 5.x with the PyTorch container's training
module). The toolkit downloads the source dir from moto's S3, pip-installs its
requirements.txt with no index, and starts torchrun on what `nvidia-smi` reports: 2 GPUs
(a stand-in; on CPU the two processes use gloo).

StopTrainingJob and a spot interruption send SIGTERM to PID 1 and SIGKILL 120 s later;
the tests send that SIGTERM to PID 1 of the namespace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from entrypoint.progress import Progress
from tests.conftest import DATA
from tests.e2e.container import layout
from tests.e2e.container.namespace import Container, usable

# Skipped on a laptop without root; on CI (root, as the workplace runs it) never: there a
# missing unshare fails these tests rather than hiding them.
pytestmark = pytest.mark.skipif(usable() is not None and not os.environ.get("CI"),
                                reason=f"PID namespaces: {usable()}")

GPUS = 2
STEPS = 24
SIGKILL_AFTER_S = 120  # SageMaker's grace period after SIGTERM

CONFIG = {
    "job_name": "toolkit-test",
    "data": {"train": str(DATA), "validation_split": 0.05, "format": "instruction",
             "columns": {"prompt": "question", "response": "answer"}},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "auto"},
    # save_steps past the end: the checkpoint a stop writes is the only one there is.
    "training": {"max_steps": STEPS, "learning_rate": 3e-3, "per_device_batch_size": 2,
                 "gradient_accumulation_steps": 1, "max_seq_length": 128, "logging_steps": 2, "save_steps": 1000,
                 "warmup_ratio": 0.0, "seed": 7},
    "compute": {"instance_type": "ml.g5.12xlarge", "instance_count": 1, "max_run_hours": 1},
    "output": {"s3_uri": "s3://my-bucket/qlora"},
    "aws": {"region": "us-east-1", "role": "arn:aws:iam::123456789012:role/SageMakerExecutionRole"},
}


@pytest.fixture(scope="module")
def submitted(moto_endpoint, tiny_model, tmp_path_factory):
    """One launch to moto; its request, and the AWS environment a container reaches moto with."""
    from launcher.aws import session
    from launcher.config import load_config
    from launcher.job import launch_job
    from tests.e2e.container.service_model import capturing

    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")).read()
    aws_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    cfg = json.loads(json.dumps(CONFIG)) | {"model": {"id": str(tiny_model)}}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in aws_env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        session.cache_clear()
        import boto3

        boto3.client("s3").create_bucket(Bucket="my-bucket")
        with capturing() as requests:
            job = launch_job(cfg)
        session.cache_clear()
        yield {"job": job, "request": requests[-1], "aws_env": aws_env, "config": load_config(cfg),
               "tmp": tmp_path_factory}


def start(submitted, name: str, *, checkpoints: Path | None = None, extra_hyperparameters: dict | None = None):
    """A container for the submitted request, laid out under a fresh directory."""
    root = submitted["tmp"].mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in submitted["aws_env"].items():
            mp.setenv(k, v)
        opt = layout.lay_out(submitted["request"], root, extra_hyperparameters=extra_hyperparameters,
                             checkpoints=checkpoints)
    env = layout.container_env(submitted["request"], root, submitted["aws_env"], GPUS)
    command = layout.container_command(submitted["request"])
    container = Container(command, opt=opt, env=env, log=root / "container.log")
    STARTED.append(container)
    return container, opt / "ml"


STARTED: list[Container] = []


@pytest.fixture(scope="module", autouse=True)
def _no_container_outlives_the_tests():
    yield
    for container in STARTED:
        container.kill()


def progress(text: str) -> Progress:
    p = Progress()
    for line in text.splitlines():
        p.update(line)
    return p


@pytest.fixture(scope="module")
def uninterrupted(submitted):
    container, ml = start(submitted, "uninterrupted")
    t0 = time.time()
    rc = container.wait(timeout=600)
    print(f"\nuninterrupted container: exit {rc} after {time.time() - t0:.1f} s")
    return {"rc": rc, "log": container.text(), "ml": ml}


@pytest.fixture(scope="module")
def stopped(submitted):
    container, ml = start(submitted, "stopped")
    container.wait_for("[train] step=4/", timeout=400)
    t0 = time.time()
    os.kill(container.pid1(), 15)
    rc = container.wait(timeout=SIGKILL_AFTER_S + 30)
    took = time.time() - t0
    print(f"\nSIGTERM to PID 1 -> checkpoint, [stopped] and exit in {took:.1f} s (SageMaker's SIGKILL: {SIGKILL_AFTER_S} s)")
    return {"rc": rc, "log": container.text(), "ml": ml, "seconds": took}


def test_the_request_starts_the_wrapper_that_keeps_the_image_start(submitted):
    command = layout.container_command(submitted["request"])
    assert command != layout.IMAGE_COMMAND and " ".join(layout.IMAGE_COMMAND) in " ".join(command)


def test_the_toolkit_runs_the_job_with_torchrun_on_two_gpus(uninterrupted):
    log = uninterrupted["log"]
    assert uninterrupted["rc"] == 0, log[-5000:]
    assert re.search(r"torchrun.*--nproc_per_node.?.?2", log), log[-5000:]  # the toolkit's invocation
    p = progress(log)
    info = next(line for line in log.splitlines() if line.startswith("[info]"))
    assert "world=2" in info and "strategy=ddp" in info
    assert p.done is not None and p.done.step == STEPS
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in (uninterrupted["ml"] / "model").iterdir()}
    assert "Reporting training SUCCESS" in log
    # the source dir came from moto's S3, the package inside it
    assert (uninterrupted["ml"] / "code" / "entrypoint" / "train.py").is_file()


def test_the_job_trained_with_the_yaml_hyperparameters(submitted, uninterrupted):
    # The job writes what it trained with into the model card's JSON block (lora, training).
    card = (uninterrupted["ml"] / "model" / "README.md").read_text()
    used = json.loads(card.split("```json", 1)[1].split("```", 1)[0])
    hp = submitted["config"].hyperparameters()
    assert used["lora"] == hp.lora.model_dump(mode="json")
    assert used["training"] == hp.training.model_dump(mode="json")


def test_metric_regexes_read_the_lines_as_the_toolkit_reprints_them(submitted, uninterrupted):
    lines = uninterrupted["log"].splitlines()
    found = {}
    for metric in submitted["request"]["AlgorithmSpecification"]["MetricDefinitions"]:
        values = [m.group(1) for line in lines if (m := re.search(metric["Regex"], line))]
        assert values, f"{metric['Name']}: no line matches {metric['Regex']}"
        found[metric["Name"]] = [float(v) for v in values]  # each capture is a number SageMaker can read
    assert len(found["train:loss"]) == STEPS // 2 and len(found["eval:loss"]) >= 1


def test_requirements_install_downloads_nothing(uninterrupted):
    # PIP_NO_INDEX=1: pip could not have downloaded; the floor is met by what is installed.
    log = uninterrupted["log"]
    assert re.search(r"Requirement already satisfied: bitsandbytes>=", log), log[-5000:]
    assert "Downloading" not in log


def test_sigterm_to_pid1_checkpoints_and_stops_well_inside_120_s(stopped):
    log = stopped["log"]
    step = int(re.search(r"^\[stopped\] step=(\d+)", log, re.M).group(1))
    assert 4 <= step < STEPS
    ckpt = stopped["ml"] / "checkpoints" / f"step-{step}"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert [p.name for p in (stopped["ml"] / "checkpoints").iterdir()] == [ckpt.name]  # the only checkpoint
    assert "[done]" not in log
    assert stopped["seconds"] < SIGKILL_AFTER_S / 2
    assert "stop_watch" not in log  # the wrapper is PID 1: the signal comes, nothing asks


@pytest.fixture(scope="module")
def restarted(submitted, stopped):
    """A second container from the same request; SageMaker restores checkpoint_s3_uri into
    its /opt/ml/checkpoints, here the stopped container's directory as it was left."""
    container, ml = start(submitted, "restarted", checkpoints=stopped["ml"] / "checkpoints")
    rc = container.wait(timeout=600)
    return {"rc": rc, "log": container.text(), "ml": ml}


def test_a_spot_restart_resumes_from_the_stop_checkpoint_by_itself(stopped, restarted, uninterrupted):
    log = restarted["log"]
    assert restarted["rc"] == 0, log[-5000:]
    stopped_at = int(re.search(r"^\[stopped\] step=(\d+)", stopped["log"], re.M).group(1))
    assert re.search(rf"^\[resume\] step={stopped_at} ", log, re.M)
    assert f"[train] step={stopped_at}/" not in log  # no step trained twice
    assert progress(log).done.step == progress(uninterrupted["log"]).done.step == STEPS
    resumed, whole = progress(log).train_loss, progress(uninterrupted["log"]).train_loss
    assert [s for s, _ in resumed] == [s for s, _ in whole if s > stopped_at]


def test_a_spot_restart_ends_with_the_uninterrupted_runs_adapter(restarted, uninterrupted):
    import torch
    from safetensors.torch import load_file

    a = load_file(str(restarted["ml"] / "model" / "adapter_model.safetensors"))
    b = load_file(str(uninterrupted["ml"] / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # as tests/e2e/test_local_run.py


def test_a_restore_whose_newest_checkpoint_lacks_trainer_pt_resumes_from_the_one_before(submitted, stopped, tmp_path):
    """The sync uploaded a newer checkpoint's manifest and adapter but not its trainer.pt
    when the instance went (before: exit 1 with FileNotFoundError on both processes)."""
    stopped_at = int(re.search(r"^\[stopped\] step=(\d+)", stopped["log"], re.M).group(1))
    restored = tmp_path / "restored"
    shutil.copytree(stopped["ml"] / "checkpoints", restored)
    newer = restored / f"step-{stopped_at + 4}"
    shutil.copytree(restored / f"step-{stopped_at}", newer)
    (newer / "trainer.pt").unlink()
    container, ml = start(submitted, "damaged-restore", checkpoints=restored)
    rc = container.wait(timeout=600)
    log = container.text()
    assert rc == 0, log[-5000:]
    assert f"[resume] skipped step-{stopped_at + 4}: trainer.pt missing\n" in log
    assert re.search(rf"^\[resume\] step={stopped_at} ", log, re.M)
    assert progress(log).done.step == STEPS


def test_each_job_line_is_reprinted_once_with_no_blank_line_after_it(uninterrupted):
    lines = uninterrupted["log"].splitlines()
    after = [lines[i + 1] for i, line in enumerate(lines[:-1]) if progress(line).last_train or line.startswith("[done]")]
    assert after and all(x.strip() for x in after)
    assert len([x for x in lines if x.startswith("[done]")]) == 1


def test_a_tuning_jobs_reserved_hyperparameter_is_accepted(submitted):
    # A tuning job adds this, not JSON-encoded, to every training job it starts.
    container, ml = start(submitted, "tuning", extra_hyperparameters={"_tuning_objective_metric": "train:loss"})
    container.wait_for("[train] step=", timeout=400)
    container.kill()


def test_the_image_start_ignores_sigterm_and_the_wrapper_passes_it_on(submitted, tmp_path):
    """Why the wrapper exists, shown without training: a fake `train` whose entry process
    reports the signal. The image's own PID 1 (bash) drops SIGTERM; the wrapper delivers it."""
    for command, delivered in ((layout.IMAGE_COMMAND, False), (layout.container_command(submitted["request"]), True)):
        root = tmp_path / ("wrapper" if delivered else "image")
        env = fake_train(submitted, root, "import signal, sys, time\n"
                         "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(143)))\n"
                         "print('entry started', flush=True)\ntime.sleep(60)\n")
        container = Container(command, opt=root / "opt", env=env, log=root / "log")
        container.wait_for("entry started", timeout=30)
        os.kill(container.pid1(), 15)
        if delivered:
            assert container.wait(timeout=30) == 143 and "got SIGTERM" in container.text()
        else:
            time.sleep(3)
            assert container.proc.poll() is None and "got SIGTERM" not in container.text()
            container.kill()
    shutil.rmtree(tmp_path, ignore_errors=True)


def fake_train(submitted, root: Path, entry: str, before: str = "") -> dict[str, str]:
    """A container tree under `root` whose `train` runs the shell lines `before`, then the entry
    script (source `entry`) as the toolkit runs it; returns the container's environment."""
    script = submitted["request"]["HyperParameters"]["sagemaker_program"].strip('"')
    (root / "opt" / "ml" / "input" / "config").mkdir(parents=True)
    (root / "opt" / "ml" / "input" / "config" / "resourceconfig.json").write_text('{"current_host": "algo-1"}')
    env = layout.container_env(submitted["request"], root, submitted["aws_env"], GPUS)
    fake = root / "bin"
    (fake / script).write_text(entry)
    (fake / "train").write_text(f'#!/bin/sh\n{before}cd "{fake}" && exec python3 -- {script}\n')
    (fake / "train").chmod(0o755)
    return env


def test_a_sigterm_before_the_entry_process_exists_is_delivered_when_it_starts(submitted, tmp_path):
    """Without training: a fake `train` that is still "installing requirements" (3 s) when
    SIGTERM reaches PID 1, then starts an entry process that imports for 1 s before it
    installs its handler. The wrapper holds the signal and delivers it to the handler."""
    root = tmp_path / "early"
    env = fake_train(submitted, root, "import signal, sys, time\nprint('entry started', flush=True)\ntime.sleep(1)\n"
                     "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(143)))\n"
                     "print('handler installed', flush=True)\ntime.sleep(60)\n",
                     before="echo installing requirements\nsleep 3\n")
    container = Container(layout.container_command(submitted["request"]), opt=root / "opt", env=env, log=root / "log")
    container.wait_for("installing requirements", timeout=30)
    os.kill(container.pid1(), 15)
    assert container.wait(timeout=30) == 143, container.text()
    log = container.text()
    assert log.index("entry started") < log.index("handler installed") < log.index("got SIGTERM"), log


def test_a_stop_while_the_toolkit_prepares_stops_the_job_at_its_first_step(submitted):
    """The real toolkit: SIGTERM to PID 1 as soon as the container starts, while the
    toolkit downloads the source dir and installs requirements and no entry process exists.
    The job still checkpoints, prints [stopped] and exits 143 (it lost 600 steps before)."""
    script = submitted["request"]["HyperParameters"]["sagemaker_program"].strip('"')
    container, ml = start(submitted, "early-stop")
    pid1 = container.pid1()
    time.sleep(0.5)
    assert not _entry_processes(pid1, script), "the entry already runs: this would not test an early stop"
    os.kill(pid1, 15)
    rc = container.wait(timeout=SIGKILL_AFTER_S + 300)
    log = container.text()
    stopped = re.search(r"^\[stopped\] step=(\d+) reason=signal_15", log, re.M)
    assert stopped, log[-5000:]
    assert int(stopped.group(1)) < STEPS and "[done]" not in log
    assert (ml / "checkpoints" / f"step-{stopped.group(1)}" / "COMPLETE").is_file()
    assert rc != 0


def _entry_processes(pid1: int, script: str) -> list[int]:
    """Processes under `pid1` whose second or third word is the entry script (as the wrapper matches)."""
    parents, found = {}, []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if script.encode() in argv[1:3]:
            found.append(int(stat.parent.name))

    def under(pid: int) -> bool:
        while pid > 1:
            if pid == pid1:
                return True
            pid = parents.get(pid, 0)
        return False

    return [pid for pid in found if under(pid)]


def set_moto_status(name: str, status: str) -> None:
    """moto's training jobs are Completed at once and it has no StopTrainingJob: the one
    thing set by hand here is the status SageMaker shows while a stop is under way."""
    from moto.sagemaker.models import sagemaker_backends

    sagemaker_backends["123456789012"]["us-east-1"].training_jobs[name].training_job_status = status


def test_a_tuning_jobs_training_job_learns_of_its_stop_without_the_signal(submitted):
    """A tuning job's definition has no ContainerEntrypoint: PID 1 is the image's bash,
    which drops SIGTERM. Rank 0 sees its own status turn Stopping (moto, asked every 1 s)
    and the job checkpoints and stops as it does on the signal."""
    request = json.loads(json.dumps(submitted["request"], default=str))
    for key in ("ContainerEntrypoint", "ContainerArguments"):
        request["AlgorithmSpecification"].pop(key, None)
    request["Environment"] = request.get("Environment", {}) | {"SM_QLORA_STOP_POLL_S": "1"}
    container, ml = start(submitted | {"request": request}, "tuning-stop")
    assert layout.container_command(request) == layout.IMAGE_COMMAND
    container.wait_for("[train] step=4/", timeout=400)
    os.kill(container.pid1(), 15)  # what StopTrainingJob sends: dropped by the image's bash
    set_moto_status(request["TrainingJobName"], "Stopping")
    try:
        rc = container.wait(timeout=SIGKILL_AFTER_S)
    finally:
        set_moto_status(request["TrainingJobName"], "Completed")
    log = container.text()
    assert "[info] stop_watch=DescribeTrainingJob every_s=1" in log
    stopped = re.search(r"^\[stopped\] step=(\d+) reason=job_stopping ", log, re.M)
    assert stopped and 4 <= int(stopped.group(1)) < STEPS, log[-5000:]
    assert (ml / "checkpoints" / f"step-{stopped.group(1)}" / "COMPLETE").is_file()
    assert rc != 0 and "[done]" not in log


def test_the_budget_clock_starts_with_the_container_not_the_job(tmp_path):
    """SageMaker's MaxRuntime runs from the container's start; the job starts later (the
    toolkit's pip install, torchrun). PID 1 here starts 2 s before the job asks."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    probe = ("import time; from entrypoint.container import container_started; "
             "now = time.time(); print(now - container_started(now))")
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
                          f"sleep 2; {sys.executable} -c '{probe}'"], capture_output=True, text=True, timeout=60,
                         env=os.environ | {"PYTHONPATH": str(ROOT), "TRAINING_JOB_NAME": "toolkit-test"})
    assert out.returncode == 0, out.stderr
    assert 1.5 <= float(out.stdout) <= 30
