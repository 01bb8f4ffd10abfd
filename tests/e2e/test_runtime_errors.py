"""AWS and disk errors as a user meets them: each one line with the right exit code (3 for
AWS, 1 or 2 for the disk), never "unexpected ..." and never a half-written result. Full
and read-only disks are real small tmpfs mounts in a mount namespace of their own
(`unshare -m`, as root), not mocked errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from launcher.cli import main
from tests.conftest import ROOT


def write_config(tmp_path: Path, raw: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def one_error_line(err: str) -> str:
    """The error the CLI printed: one `error:` line (and at most its `->` hint)."""
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and "unexpected" not in err, err
    return errors[0]


# --------------------------------------------------------------------------- AWS: exit 3

def test_an_upload_to_a_missing_bucket_is_an_aws_error_said_once(aws, job_dict, tmp_path, capsys):
    job_dict["output"]["s3_uri"] = "s3://no-such-bucket-i19/qlora"
    assert main(["launch", str(write_config(tmp_path, job_dict))]) == 3
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert "no-such-bucket-i19" in line
    assert err.count("NoSuchBucket") <= 1, err  # the refusal once, not once per layer


@pytest.fixture
def no_credentials(aws, tmp_path, monkeypatch):
    """A region and moto's endpoint, but no credentials anywhere boto3 looks (no instance
    metadata either: nothing leaves loopback)."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(tmp_path / "runs"))
    from launcher.aws import session

    session.cache_clear()
    yield
    session.cache_clear()


@pytest.mark.parametrize("argv", [["status", "some-job"], ["stop", "some-job"], ["download", "some-job", "DEST"],
                                  ["merge", "some-job", "s3://my-bucket/merged"], ["plot", "some-job"],
                                  ["logs", "some-job"]])
def test_no_credentials_is_exit_3_in_one_line_for_every_job_verb(no_credentials, tmp_path, capsys, argv):
    argv = [str(tmp_path / "dest") if a == "DEST" else a for a in argv]
    assert main(argv) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "no AWS credentials" in line
    assert not (tmp_path / "dest").exists() and not Path("some-job-loss.png").exists()


def test_every_error_type_is_importable_from_the_package():
    import launcher

    for name in ("LauncherError", "ConfigError", "AWSError", "JobFailed", "Interrupted", "DiskError"):
        assert issubclass(getattr(launcher, name), launcher.LauncherError) and name in launcher.__all__


def test_list_max_0_is_a_usage_error(capsys):
    assert main(["list", "--max", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max" in err and "between 1 and 100" in err and "network" not in err


# --------------------------------------------------------------------------- the disk: one line, nothing half-written

def can_mount() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs root and `unshare -m` to mount a small tmpfs")


def cli_on_small_disk(mount: Path, size: str, argv: list[str], env: dict, read_only: bool = False):
    """`sm-qlora ARGV` with a fresh tmpfs of `size` at `mount`, seen by that process alone."""
    mount.mkdir(parents=True, exist_ok=True)
    ro = f" && mount -o remount,ro {mount}" if read_only else ""
    script = f'mount -t tmpfs -o size={size} tmpfs {mount}{ro} && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "launcher", *argv],
                          capture_output=True, text=True, env=os.environ | env, timeout=300)


@pytest.fixture
def finished_run(tmp_path) -> tuple[str, dict]:
    """A Completed local run whose adapter is 300 KB: weights, config and a tokenizer."""
    name = "tiny-20261129-000000"
    root = tmp_path / "runs" / name
    (root / "model").mkdir(parents=True)
    (root / "job.json").write_text(json.dumps({"name": name, "status": "Completed", "started": 1.0, "ended": 2.0}))
    (root / "model" / "adapter_model.safetensors").write_bytes(os.urandom(150_000))
    (root / "model" / "adapter_config.json").write_text("{}")
    (root / "model" / "tokenizer.json").write_bytes(os.urandom(150_000))
    return name, {"SM_QLORA_RUNS_DIR": str(tmp_path / "runs"), "PYTHONPATH": str(ROOT)}


@needs_mount
def test_a_download_onto_a_full_disk_leaves_no_partial_file(finished_run, tmp_path):
    name, env = finished_run
    disk = tmp_path / "small"
    result = cli_on_small_disk(disk, "200k", ["download", name, str(disk / "adapter")], env)
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert "no space left on" in line and str(disk / "adapter") in line


@needs_mount
def test_a_full_disk_keeps_the_destination_as_it_was(finished_run, tmp_path):
    """The same download, then a listing of the destination inside the same namespace."""
    name, env = finished_run
    disk = tmp_path / "small"
    disk.mkdir()
    script = (f'mount -t tmpfs -o size=200k tmpfs {disk} && "$@"; echo "EXIT=$?"; '
              f'find {disk} -type f -printf "%s %P\\n"')
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "launcher",
                             "download", name, str(disk / "adapter")],
                            capture_output=True, text=True, env=os.environ | env, timeout=300)
    assert "EXIT=1" in result.stdout, result.stderr
    files = result.stdout.split("EXIT=1", 1)[1].split()
    assert files == [], f"left on the full disk: {files}"  # no 0-byte tokenizer.json beside the weights


@needs_mount
def test_a_download_onto_a_read_only_disk_says_so(finished_run, tmp_path):
    name, env = finished_run
    disk = tmp_path / "ro"
    result = cli_on_small_disk(disk, "1m", ["download", name, str(disk / "adapter")], env, read_only=True)
    assert result.returncode == 1
    assert "read-only file system" in one_error_line(result.stderr)


def test_a_download_into_a_file_or_under_a_file_is_one_line(finished_run, tmp_path, monkeypatch, capsys):
    name, env = finished_run
    monkeypatch.setenv("SM_QLORA_RUNS_DIR", env["SM_QLORA_RUNS_DIR"])
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert main(["download", name, str(a_file)]) == 2
    assert f"{a_file} is a file" in one_error_line(capsys.readouterr().err)
    assert main(["download", name, str(a_file / "adapter")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(a_file) in line and "is a file, not a directory" in line
    assert a_file.read_text() == "keep me"


def test_a_download_leaves_no_staging_directory_behind(finished_run, tmp_path, monkeypatch, capsys):
    name, env = finished_run
    monkeypatch.setenv("SM_QLORA_RUNS_DIR", env["SM_QLORA_RUNS_DIR"])
    dest = tmp_path / "adapter"
    assert main(["download", name, str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "tokenizer.json"]  # no staging directory left behind


# --------------------------------------------------------------------------- plot and list say what is there

def test_plot_of_a_job_that_does_not_exist_fails_and_writes_nothing(aws, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "no-such-job"]) == 3
    assert "no training job named no-such-job" in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_plot_refuses_a_name_that_is_a_path(aws, tmp_path, monkeypatch, capsys):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for name in ("../../x", "/tmp/x", ".."):
        assert main(["plot", name]) == 2
        assert "is not a job name" in one_error_line(capsys.readouterr().err)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def long_run(runs: Path, steps: int, chatter: int) -> str:
    """A Completed local run whose log has `steps` training lines, each after `chatter` others."""
    from entrypoint.progress import format_eta

    name = "long-20261129-000000"
    root = runs / name
    (root / "output").mkdir(parents=True)
    (root / "job.json").write_text(json.dumps({"name": name, "status": "Completed", "started": 1.0, "ended": 2.0}))
    lines = []
    for step in range(1, steps + 1):
        lines += [f"chatter {i}" for i in range(chatter)]
        lines.append(f"[train] step={step}/{steps} epoch=0.10 loss={3 - step / steps:.4f} lr=1.00e-04 "
                     f"grad_norm=0.50 tokens_per_sec=100 eta={format_eta(steps - step)}")
    (root / "output" / "job.log").write_text("\n".join(lines) + "\n")
    return name


def test_plot_and_status_plot_draw_every_step_of_a_long_job(tmp_path, monkeypatch, capsys):
    """3,000 steps among 15,000 log lines: the first step is on the curve too."""
    import launcher.job

    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(tmp_path / "runs"))
    name = long_run(tmp_path / "runs", steps=3000, chatter=4)
    drawn = []
    real = launcher.job.write_loss_png
    monkeypatch.setattr(launcher.job, "write_loss_png", lambda p, path, title: drawn.append(p) or real(p, path, title))
    assert main(["plot", name, "--out", str(tmp_path / "loss.png")]) == 0
    assert main(["status", name, "--plot", str(tmp_path / "status.png")]) == 0
    for progress in drawn:
        steps = [s for s, _ in progress.train_loss]
        assert steps == list(range(1, 3001))
    assert len(drawn) == 2 and (tmp_path / "loss.png").stat().st_size > 0


@pytest.fixture
def no_aws(tmp_path, monkeypatch):
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    from launcher.aws import session

    session.cache_clear()
    yield
    session.cache_clear()


def test_list_reads_a_killed_run_as_ended_and_skips_a_damaged_one(no_aws, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(runs))
    killed = runs / "killed-20261129-000001"
    (killed / "output").mkdir(parents=True)
    # job.json still says InProgress, but no process holds the run's lock: its owner was killed
    (killed / "job.json").write_text(json.dumps({"name": killed.name, "status": "InProgress", "started": 5.0}))
    (killed / "output" / "job.log").write_text("[train] step=1/10 epoch=0.10 loss=2.0000 lr=1.00e-04 "
                                               "grad_norm=0.50 tokens_per_sec=100 eta=0:00:09\n")
    damaged = runs / "damaged-20261129-000002"
    damaged.mkdir()
    (damaged / "job.json").write_text('{"name": "damaged", "stat')
    fine = runs / "fine-20261129-000003"
    fine.mkdir()
    (fine / "job.json").write_text(json.dumps({"name": fine.name, "status": "Completed", "started": 9.0}))
    assert main(["list", "--output", "json"]) == 0
    captured = capsys.readouterr()
    jobs = {j["job_name"]: j["status"] for j in json.loads(captured.out)["jobs"]}
    assert jobs == {killed.name: "Failed", fine.name: "Completed"}
    assert "skipped a damaged local run" in captured.err and str(damaged / "job.json") in captured.err


# --------------------------------------------------------------------------- local launches

@pytest.fixture
def stand_in_trainer(tmp_path, monkeypatch):
    """The run's owner as it is, with a trainer that ends at once with `exit_code` (the
    naming, the claim and the messages are under test, not training)."""
    import launcher.local

    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(tmp_path / "runs"))

    def use(exit_code: int = 0) -> None:
        script = f"import sys; print('[done] steps=1 train_loss=1.0 runtime_s=0 adapter=x'); sys.exit({exit_code})"
        monkeypatch.setattr(launcher.local, "TRAINER", ("-c", script))

    return use


def test_four_local_launches_in_one_second_get_four_runs(stand_in_trainer, job_dict, tmp_path, monkeypatch):
    import launcher.job
    from launcher.config import job_name_for

    stand_in_trainer(0)
    monkeypatch.setattr(launcher.job, "job_name_for", lambda base: job_name_for(base, now=1764410100.0))
    names = [launcher.job.launch_job(job_dict, local=True, echo=False).name for _ in range(4)]
    assert len(set(names)) == 4
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(names)
    assert names[0] == job_name_for(job_dict["job_name"], now=1764410100.0)


def test_a_stopped_local_run_names_the_real_config_in_its_resume_hint(stand_in_trainer, job_dict, tmp_path, capsys):
    stand_in_trainer(143)  # checkpointed and stopped
    path = write_config(tmp_path, job_dict, "medical.yaml")
    assert main(["launch", str(path), "--local"]) == 1
    err = capsys.readouterr().err
    assert f"sm-qlora launch {path} --local --resume " in err and "CONFIG" not in err


def test_launch_local_without_the_train_extra_names_the_pip_command(stand_in_trainer, job_dict, tmp_path,
                                                                      monkeypatch, capsys):
    stand_in_trainer(0)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if `pip install sagemaker-qlora` without [train]
    assert main(["launch", str(write_config(tmp_path, job_dict)), "--local"]) == 2
    err = capsys.readouterr().err
    assert "peft" in one_error_line(err) and "pip install 'sagemaker-qlora[train]'" in err
    assert not (tmp_path / "runs").exists()  # refused before anything was laid out


# --------------------------------------------------------------------------- merge: a dry run writes nothing, one writer wins

from tests.e2e.test_merge import adapter, fake_local_run  # noqa: E402,F401  (the tiny adapter fixture)


def test_merge_dry_run_of_a_local_run_writes_nothing(tiny_model, adapter, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(tmp_path / "runs"))
    fake_local_run(tmp_path / "runs", "tiny-20261129-000000", tiny_model, adapter)
    before = sorted(tmp_path.rglob("*"))
    assert main(["merge", "tiny-20261129-000000", str(tmp_path / "merged"), "--dry-run", "--output", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] is True and "entrypoint.merge" in out["command"]
    assert sorted(tmp_path.rglob("*")) == before


def test_two_merges_into_one_destination_one_wins_the_other_says_so(tiny_model, adapter, tmp_path):  # noqa: F811
    dest = tmp_path / "merged"
    cmd = [sys.executable, "-m", "entrypoint.merge", "--adapter", str(adapter), "--base", str(tiny_model),
           "--out", str(dest), "--dtype", "fp32"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    # bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" is filtered
    assert not [r for r in results if "kernels-community" in r[1] + r[2]]
    loser = next(r for r in results if r[0] == 2)
    assert "Traceback" not in loser[1] + loser[2]
    errors = [x for x in loser[1].splitlines() if x.startswith("[error]")]
    assert len(errors) == 1 and str(dest) in errors[0], loser
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(dest)  # the winner's model is whole
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging directory left


def test_adapter_and_merged_weights_are_0644_like_the_files_beside_them(tiny_model, adapter, tmp_path):  # noqa: F811
    from entrypoint.merge import MergeSpec, merge

    merge(MergeSpec(adapter=str(adapter), base=str(tiny_model), out=str(tmp_path / "merged"), dtype="fp32"))
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "merged").iterdir()}
    assert set(modes.values()) == {"0o644"}, modes  # umask 022 here, as on most machines

    import torch
    from safetensors.torch import save_file

    from entrypoint import checkpoints

    with checkpoints.staged(tmp_path / "model") as tmp:  # how the job writes its adapter
        save_file({"w": torch.zeros(2)}, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text("{}")
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "model").iterdir()}
    assert modes == {"adapter_model.safetensors": "0o644", "adapter_config.json": "0o644"}


@needs_mount
def test_a_local_run_that_fills_its_disk_records_no_space_left(tiny_model, tmp_path):
    """A real run of the tiny model with its runs directory on a 250 KB tmpfs: the layout
    and the log fit, the 310 KB adapter does not."""
    cfg = {"job_name": "tiny-full", "model": {"id": str(tiny_model)},
           "data": {"train": str(ROOT / "examples" / "data" / "medical.jsonl"), "format": "instruction",
                    "columns": {"prompt": "question", "response": "answer"}},
           "training": {"max_steps": 2, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                        "max_seq_length": 128, "logging_steps": 1, "save_steps": 100},
           "compute": {"instance_type": "ml.g5.xlarge"}, "output": {"s3_uri": "s3://local/tiny"},
           "aws": {"region": "us-east-1", "role": "arn:aws:iam::123456789012:role/Local"}}
    path = write_config(tmp_path, cfg)
    runs = tmp_path / "runs"
    runs.mkdir()
    script = (f'mount -t tmpfs -o size=250k tmpfs {runs} && "$@"; echo "EXIT=$?"; cat {runs}/*/job.json')
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "launcher",
                             "launch", str(path), "--local"], capture_output=True, text=True, timeout=600,
                            env=os.environ | {"SM_QLORA_RUNS_DIR": str(runs), "PYTHONPATH": str(ROOT)})
    head, _, state = result.stdout.partition("EXIT=")
    assert state.startswith("1"), result.stdout + result.stderr
    reason = json.loads(state.split("\n", 1)[1])["failure_reason"]
    assert reason.startswith(f"no space left on {runs}/tiny-full-"), reason
    assert "Traceback" not in head + result.stderr and "SafetensorError" not in head + result.stderr
    assert "no space left on" in one_error_line(result.stderr)
    assert "kernels-community" not in head + result.stderr  # bitsandbytes' CPU-kernel notice is filtered


def test_local_logs_json_carries_when_each_line_was_written(stand_in_trainer, job_dict, tmp_path, monkeypatch,
                                                            capsys):
    import launcher.local

    script = ("import time; print('[info] first', flush=True); time.sleep(1.5); "
              "print('[done] steps=1 train_loss=1.0 runtime_s=2 adapter=x', flush=True)")
    monkeypatch.setattr(launcher.local, "TRAINER", ("-c", script))
    from launcher.job import launch_job

    started = time.time() * 1000
    job = launch_job(job_dict, local=True, echo=False)
    ended = time.time() * 1000
    time.sleep(1.0)  # read a second after the run ended
    assert main(["logs", job.name, "--output", "json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    stamps = [x["timestamp"] for x in lines if x.get("message", "").startswith(("[info] first", "[done]"))]
    assert len(stamps) == 2
    assert started <= stamps[0] < stamps[1] <= ended  # written during the run, not stamped when read
    assert stamps[1] - stamps[0] >= 1200  # the 1.5 s between them, to the owner's 0.2 s polls


def test_an_aws_refusal_of_the_job_is_said_once(aws, job_dict, tmp_path, monkeypatch, capsys):
    """SageMaker refuses the CreateTrainingJob (moto accepts it, so the refusal is made at
    botocore's API call, under the SageMaker SDK that sends it)."""
    from botocore.client import BaseClient
    from botocore.exceptions import ClientError

    real = BaseClient._make_api_call

    def refuse(self, operation, params):
        if operation == "CreateTrainingJob":
            raise ClientError({"Error": {"Code": "ValidationException", "Message": "refused-i19: no such role"}},
                              operation)
        return real(self, operation, params)

    monkeypatch.setattr(BaseClient, "_make_api_call", refuse)
    assert main(["launch", str(write_config(tmp_path, job_dict))]) == 3
    err = capsys.readouterr().err
    assert err.count("refused-i19") == 1, err
    assert "troubleshooting" not in err, err
    one_error_line(err)


def test_plot_of_a_sagemaker_job_reads_every_cloudwatch_page(aws, job_dict, tmp_path, monkeypatch):
    """12,000 lines in the job's stream (more than one GetLogEvents page): the plot starts at step 1."""
    import launcher.job
    from launcher.job import launch_job

    job = launch_job(job_dict)  # moto: the job exists
    logs = boto3.client("logs")
    logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    stream = f"{job.name}/algo-1-1700000000"
    logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream)
    t0 = int(time.time() * 1000) - 3_600_000
    messages = []
    for step in range(1, 3001):
        messages += [f"chatter {step}-{i}" for i in range(3)]
        messages.append(f"[train] step={step}/3000 epoch=0.10 loss={3 - step / 3000:.4f} lr=1.00e-04 "
                        "grad_norm=0.50 tokens_per_sec=100 eta=0:00:01")
    for start in range(0, len(messages), 5000):
        logs.put_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream, logEvents=[
            {"timestamp": t0 + i, "message": m} for i, m in enumerate(messages[start:start + 5000], start)])
    drawn = []
    monkeypatch.setattr(launcher.job, "write_loss_png", lambda p, path, title: drawn.append(p) or path)
    assert main(["plot", job.name, "--out", str(tmp_path / "loss.png")]) == 0
    assert [s for s, _ in drawn[0].train_loss] == list(range(1, 3001))


def test_launch_job_local_shows_the_log_by_default(stand_in_trainer, job_dict, capsys):
    from launcher.job import launch_job

    stand_in_trainer(0)
    launch_job(job_dict, local=True)
    assert "[done] steps=1" in capsys.readouterr().out  # a Python user is not left silent for minutes
    launch_job(job_dict, local=True, echo=False)
    assert "[done]" not in capsys.readouterr().out


@needs_mount
def test_the_failure_file_on_a_full_disk_is_whole_or_absent_never_empty(tmp_path):
    """SageMaker's FailureReason is /opt/ml/output/failure; the toolkit writes its own only when
    none is there, so an empty file left by a write that ran out of space would hide the cause."""
    out = tmp_path / "output"
    out.mkdir()
    probe = ("import os, sys; from entrypoint import train; "
             "open(os.path.join(sys.argv[1], 'filler'), 'wb').write(b'x' * FILL) if FILL else None; "
             "train.record_failure('no space left on /opt/ml/model: free some there', 1)")
    for fill, expect in ((64 * 1024, "absent"), (0, "whole")):
        script = f'mount -t tmpfs -o size=64k tmpfs {out} && "$@"; ls -l {out}; cat {out}/failure 2>/dev/null'
        result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-c",
                                 probe.replace("FILL", str(fill)), str(out)], capture_output=True, text=True,
                                env=os.environ | {"SM_OUTPUT_DIR": str(out), "PYTHONPATH": str(ROOT)}, timeout=120)
        listing = result.stdout
        if expect == "absent":
            assert " failure\n" not in listing and "failure.partial" not in listing, listing + result.stderr
        else:
            assert listing.rstrip().endswith("no space left on /opt/ml/model: free some there"), listing
