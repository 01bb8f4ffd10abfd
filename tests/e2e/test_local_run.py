"""The training job itself, run here through the local runner: the same entrypoint, the
same SM_* environment and /opt/ml layout a SageMaker container gets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoint.progress import Progress
from launcher.errors import JobFailed
from launcher.job import Job, launch_job
from tests.conftest import DATA, ROOT

BASE = {
    "job_name": "tiny-test",
    "data": {"train": str(DATA), "format": "instruction", "columns": {"prompt": "question", "response": "answer"}},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "auto"},
    "training": {"max_steps": 24, "learning_rate": 3e-3, "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
                 "max_seq_length": 128, "logging_steps": 4, "save_steps": 4, "warmup_ratio": 0.0, "seed": 7},
    "output": {"s3_uri": "s3://local/tiny"},
    "aws": {"role": "arn:aws:iam::123456789012:role/Local"},
}


def config(tiny_model: Path, **training) -> dict:
    cfg = json.loads(json.dumps(BASE))
    cfg["model"] = {"id": str(tiny_model)}
    cfg["training"].update(training)
    return cfg


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


def progress_of(job: Job) -> Progress:
    p = Progress()
    for line in (job.local_dir / "output" / "job.log").read_text().splitlines():
        p.update(line)
    return p


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """One uninterrupted run, shared by the tests that read its results."""
    runs = tmp_path_factory.mktemp("runs")
    os.environ["SM_QLORA_RUNS_DIR"] = str(runs)
    try:
        job = launch_job(config(tiny_model), local=True)
    finally:
        del os.environ["SM_QLORA_RUNS_DIR"]
    return job


def test_a_local_run_lays_out_the_container_and_finishes(finished):
    root = finished.local_dir
    assert re.fullmatch(r"tiny-test-\d{8}-\d{6}", finished.name)
    hp = json.loads((root / "input" / "config" / "hyperparameters.json").read_text())
    assert hp["lora.r"] == "8"  # JSON-encoded, as the Estimator writes them
    assert (root / "input" / "data" / "train" / "medical.jsonl").is_file()
    assert finished.status() == "Completed"
    assert (root / "loss.png").read_bytes()[:4] == b"\x89PNG"  # the runner plots the loss curve
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in (root / "model").iterdir()}


def test_progress_lines_follow_the_spec_and_the_loss_falls(finished):
    log = (finished.local_dir / "output" / "job.log").read_text()
    assert "\r" not in log and "Loading checkpoint shards" not in log  # no tqdm bars in the log
    train = [x for x in log.splitlines() if x.startswith("[train]")]
    assert re.fullmatch(r"\[train\] step=4/24 epoch=\S+ loss=\d+\.\d{4} lr=\S+e[-+]\d\d grad_norm=\S+ "
                        r"tokens_per_sec=\d+ eta=\d+:\d\d:\d\d", train[0])
    assert re.search(r"^\[checkpoint\] step=4 path=\S+/checkpoints/step-4$", log, re.M)
    assert re.search(r"^\[done\] steps=24 train_loss=\S+ runtime_s=\d+ adapter=\S+/model$", log, re.M)
    # the tiny Mixtral's MoE blocks ran the fused pass (training.fused_moe defaults to true);
    # no GPU here, so its SwiGLU took the torch path; checkpointed layer inputs were kept in host
    # memory (training.offload_checkpoints defaults to true)
    assert re.search(r"^\[model\] linear4bit=\d+ .* checkpoints=host moe=fused-torch$", log, re.M), log[:2000]
    assert re.search(r"^\[model\] linear4bit=32 experts=nf4 expert_matrices=24 ", log, re.M)  # 2 layers x 4 x w1/w3/w2
    p = progress_of(finished)
    losses = [loss for _, loss in p.train_loss]
    assert losses[-1] < losses[0] - 0.05, losses


def test_the_adapter_loads_with_peft_and_changes_the_model(finished, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = finished.local_dir / "model"
    tok = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = tok("[INST] What causes gout? [/INST]", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        after = tuned(ids).logits
    assert not torch.allclose(before, after)
    card = (adapter / "README.md").read_text()
    assert f"base_model: {tiny_model}" in card and "optimizer steps: 24" in card and "medical.jsonl" in card


def test_sigterm_checkpoints_and_resume_ends_like_an_uninterrupted_run(finished, tiny_model, runs, tmp_path):
    cfg_path = tmp_path / "job.json"
    cfg_path.write_text(json.dumps(config(tiny_model)))
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "launch", str(cfg_path), "--local"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    log = None
    while time.time() < deadline:
        logs = list(runs.glob("*/output/job.log"))
        if logs and "[checkpoint] step=4 " in logs[0].read_text():
            log = logs[0]
            break
        time.sleep(0.02)
    assert log is not None, "no checkpoint appeared"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    text = log.read_text()
    stopped = int(re.search(r"^\[stopped\] step=(\d+)", text, re.M).group(1))
    assert 4 <= stopped < 24, "the run ended before the signal could stop it"
    name = log.parent.parent.name

    resumed = launch_job(cfg_path, local=True, resume=name)
    text = log.read_text()
    assert re.search(rf"^\[resume\] step={stopped} ", text, re.M)
    assert "[done] steps=24 " in text
    a = load_file(str(resumed.local_dir / "model" / "adapter_model.safetensors"))
    b = load_file(str(finished.local_dir / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_a_bad_data_row_fails_the_job_with_its_file_and_row(tiny_model, runs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    # validate checks every row's prompt and response before anything starts; the job also
    # refuses a column whose type changes between rows (`datasets` cannot read it), here one
    # the config does not use
    bad.write_text('{"question": "a?", "answer": "b.", "note": "x"}\n' * 101
                   + '{"question": "c?", "answer": "d.", "note": 3}\n')
    cfg = config(tiny_model)
    cfg["data"]["train"] = str(bad)
    with pytest.raises(JobFailed) as info:
        launch_job(cfg, local=True)
    assert "bad.jsonl: row 102: column 'note' is a number, but text in row 1" in str(info.value)
    job = Job.attach(next(runs.iterdir()).name)
    assert job.status() == "Failed"
    assert "row 102" in (job.local_dir / "output" / "failure").read_text()


def test_invalid_hyperparameters_stop_the_job_at_once_with_one_line(runs, tmp_path):
    cfg_dir = tmp_path / "input" / "config"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "hyperparameters.json").write_text(json.dumps(
        {"model.id": '"x/y"', "data.train": '"d.jsonl"', "lora.r": "0", "sagemaker_program": '"sm_qlora_entry.py"'}))
    proc = subprocess.run([sys.executable, "-m", "entrypoint"], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"SM_INPUT_CONFIG_DIR": str(cfg_dir), "SM_OUTPUT_DIR": str(tmp_path / "out"),
                                            "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    errors = [x for x in proc.stdout.splitlines() if x.startswith("[error]")]
    assert errors == ["[error] reason=invalid hyperparameters: lora.r: Input should be greater than or equal to 1"]
    assert "Traceback" not in proc.stderr


def test_a_local_run_honours_compute_strategy():
    from launcher.config import load_config
    from launcher.local import strategy_here, trainer_command

    cfg = load_config(BASE | {"model": {"id": "org/model"}})
    assert strategy_here(cfg, 0) == "single" and strategy_here(cfg, 4) == "ddp"
    forced = load_config(BASE | {"model": {"id": "org/model"}, "compute": {"strategy": "model_parallel"}})
    assert strategy_here(forced, 4) == "model_parallel"
    assert trainer_command("model_parallel", 4)[1:] == ["-m", "entrypoint"]  # one process over every GPU
    assert trainer_command("ddp", 1)[1:] == ["-m", "entrypoint"]
    assert trainer_command("ddp", 4)[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                                             "-m", "entrypoint"]


def two_stand_in_gpus(tmp_path) -> str:
    """A PATH whose nvidia-smi lists two GPUs (there is no CUDA: the ranks use gloo on CPU)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: Stand-in (UUID: GPU-0)"\n'
                                     'echo "GPU 1: Stand-in (UUID: GPU-1)"\n')
    (fake / "nvidia-smi").chmod(0o755)
    return f"{fake}{os.pathsep}{os.environ['PATH']}"


def test_a_local_ddp_run_starts_torchrun_and_rank0_alone_writes(tiny_model, runs, tmp_path, monkeypatch):
    """What SageMaker starts on a multi-GPU instance (torch_distributed), here through the
    local runner: it counts GPUs as the toolkit does (nvidia-smi; a stand-in listing two)
    and starts torchrun with one process per GPU. There is no CUDA, so they train on CPU
    with gloo."""
    monkeypatch.setenv("PATH", two_stand_in_gpus(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = config(tiny_model, max_steps=6, save_steps=3, logging_steps=3)
    cfg["compute"] = {"instance_type": "ml.g5.12xlarge", "strategy": "ddp"}
    job = launch_job(cfg, local=True)
    root = job.local_dir
    hps = json.loads((root / "input" / "config" / "hyperparameters.json").read_text())
    assert json.loads(hps["strategy"]) == "ddp"
    lines = (root / "output" / "job.log").read_text().splitlines()
    info = [x for x in lines if x.startswith("[info] job=")]
    assert len(info) == 1 and "world=2" in info[0] and "strategy=ddp" in info[0]
    assert len([x for x in lines if x.startswith("[done] steps=6 ")]) == 1  # printed by rank 0 only
    assert len([x for x in lines if x.startswith("[checkpoint] step=3 ")]) == 1
    assert (root / "model" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-3"]


def test_sigterm_under_torchrun_leaves_one_checkpoint_that_one_process_continues(tiny_model, runs, tmp_path):
    """Stop a 2-process ddp run: every rank stops at the same step and rank 0 writes one
    complete checkpoint; a resume on a machine with one process (no GPUs) continues it."""
    cfg = config(tiny_model, max_steps=12, save_steps=2, logging_steps=2)
    cfg["compute"] = {"instance_type": "ml.g5.12xlarge", "strategy": "ddp"}
    cfg_path = tmp_path / "job.json"
    cfg_path.write_text(json.dumps(cfg))
    env = os.environ | {"PYTHONPATH": str(ROOT), "PATH": two_stand_in_gpus(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "launch", str(cfg_path), "--local"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline, log = time.time() + 240, None
    while time.time() < deadline and log is None:
        found = [p for p in runs.glob("*/output/job.log") if "[checkpoint] step=2 " in p.read_text()]
        log = found[0] if found else None
        time.sleep(0.05)
    assert log is not None, "no checkpoint appeared"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    text = log.read_text()
    assert "world=2" in text
    stops = re.findall(r"^\[stopped\] step=(\d+) reason=signal_15", text, re.M)
    assert len(stops) == 1, text[-2000:]
    stopped = int(stops[0])
    assert 2 <= stopped < 12, "the run ended before the signal could stop it"
    root = log.parent.parent
    assert (root / "checkpoints" / f"step-{stopped}" / "COMPLETE").is_file()
    assert not list((root / "checkpoints").glob("*.partial"))

    env["PATH"] = os.environ["PATH"]  # no GPUs now: one process takes the run over
    resumed = subprocess.run([sys.executable, "-m", "launcher", "launch", str(cfg_path), "--local",
                              "--resume", root.name], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    text = log.read_text()
    assert re.search(rf"^\[resume\] step={stopped} ", text, re.M)
    assert "world=1" in text.split("[resume]")[0].rsplit("[info] job=", 1)[1]
    assert re.search(r"^\[done\] steps=12 ", text, re.M)
    assert (root / "model" / "adapter_model.safetensors").is_file()
