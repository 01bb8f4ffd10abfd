"""`sm-qlora merge` on the tiny model: the merged model computes what base + adapter
computes through peft, and loads with transformers alone.

No training here: the adapter is made with peft on the tiny base with random LoRA A and
B (`init_lora_weights=False`), so the merge really changes every targeted weight.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoint.merge import MergeSpec, merge
from tests.conftest import ROOT

torch = pytest.importorskip("torch")

LOAD_WITHOUT_PEFT = """
import sys, json, torch
sys.modules["peft"] = None          # any attempt to import peft now fails
sys.modules["bitsandbytes"] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save({"logits": logits, "class": type(model).__name__,
            "lora": [n for n, _ in model.named_parameters() if "lora" in n]}, sys.argv[3])
"""

IDS = [[1, 17, 200, 45, 999, 3, 64, 1500, 7, 2]]
TF_MAJOR = int(pytest.importorskip("transformers").__version__.split(".")[0])


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    # the experts as the job's adapter targets them on this stack: w1/w2/w3 modules on
    # transformers 4, the 3D parameters on transformers 5 (PEFT's target_parameters)
    experts = {"target_modules": ["w1", "w2", "w3"]} if TF_MAJOR < 5 else {
        "target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                        **{**experts, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         *experts["target_modules"]]})
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def peft_logits(tiny_model: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


def base_logits(tiny_model: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        return base(input_ids=torch.tensor(IDS)).logits


def test_merged_model_equals_base_plus_adapter_and_needs_no_peft(tiny_model, adapter, tmp_path):
    out = merge(MergeSpec(adapter=str(adapter), base=str(tiny_model), out=str(tmp_path / "merged"), dtype="fp32",
                          adapter_job="tiny-medical-20261129-101500", data="examples/data/medical.jsonl"))
    result = tmp_path / "result.pt"
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PEFT, str(out), json.dumps(IDS), str(result)], check=True,
                   cwd=ROOT)
    loaded = torch.load(result)
    expected = peft_logits(tiny_model, adapter)
    assert loaded["class"] == "MixtralForCausalLM" and loaded["lora"] == []
    assert torch.allclose(loaded["logits"], expected, atol=1e-4, rtol=0), \
        f"max diff {(loaded['logits'] - expected).abs().max():.2e}"
    # the adapter matters: without it the logits differ by far more than the tolerance
    assert (base_logits(tiny_model) - expected).abs().max() > 1e-2
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names and "tokenizer.json" in names and "README.md" in names
    assert any(n.endswith(".safetensors") for n in names) and "adapter_config.json" not in names
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_model}" in card
    assert f"the adapter needs transformers {TF_MAJOR}.x" in card
    assert "tiny-medical-20261129-101500" in card and "examples/data/medical.jsonl" in card
    assert not list(tmp_path.glob(".*partial*")), "the staging directory was left behind"


def test_default_dtype_on_cpu_writes_bf16(tiny_model, adapter, tmp_path):
    out = merge(MergeSpec(adapter=str(adapter), base=str(tiny_model), out=str(tmp_path / "merged")))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    shard = next(out.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_a_failed_merge_leaves_nothing_and_an_existing_model_is_not_overwritten(tiny_model, adapter, tmp_path):
    import shutil

    from entrypoint.merge import BadInput

    broken = tmp_path / "broken-adapter"
    shutil.copytree(adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ"):
        merge(MergeSpec(adapter=str(broken), base=str(tiny_model), out=str(work / "m")))
    assert sorted(p.name for p in work.iterdir()) == []  # no model, no staging directory
    with pytest.raises(BadInput, match="not a model directory"):
        merge(MergeSpec(adapter=str(adapter), base=str(tmp_path / "no-such-base"), out=str(work / "m")))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "model.safetensors").write_text("someone's model")
    with pytest.raises(BadInput, match="not empty"):
        merge(MergeSpec(adapter=str(adapter), base=str(tiny_model), out=str(busy)))
    assert (busy / "model.safetensors").read_text() == "someone's model"


def test_an_adapter_of_the_other_transformers_stack_is_refused_in_one_line(adapter, tiny_model, tmp_path):
    """Expert LoRA is bound to its layout: per-expert w1/w2/w3 modules (transformers 4) or
    3D parameters (transformers 5); the merge says which image to use, before loading anything."""
    import shutil

    from entrypoint.card import adapter_stack
    from entrypoint.merge import BadInput

    other = tmp_path / "other-stack"
    shutil.copytree(adapter, other)
    config = json.loads((other / "adapter_config.json").read_text())
    assert adapter_stack(config)[0] == TF_MAJOR
    if TF_MAJOR < 5:
        config.update(target_modules=["q_proj", "v_proj"], target_parameters=["experts.gate_up_proj"])
    else:
        config.update(target_modules=["q_proj", "w1", "w2", "w3"], target_parameters=None)
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput) as err:
        merge(MergeSpec(adapter=str(other), base=str(tiny_model), out=str(tmp_path / "m")))
    message = str(err.value)
    assert "\n" not in message and f"needs transformers {5 if TF_MAJOR < 5 else 4}.x" in message
    assert ("2.9.0-transformers5.3.0" if TF_MAJOR < 5 else "2.8.0-transformers4.56.2") in message
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- the launcher's side

def cli(argv: list[str]) -> int:
    """The verb through the real `sm-qlora` entry point."""
    from launcher.cli import main

    return main(argv)


def fake_local_run(runs: Path, name: str, tiny_model: Path, adapter: Path, status: str = "Completed") -> Path:
    """runs/<name>/ as a finished local run leaves it: job.json, the hyperparameters, the adapter."""
    import shutil

    from entrypoint.hyperparams import Hyperparameters, flatten

    root = runs / name
    (root / "input" / "config").mkdir(parents=True)
    shutil.copytree(adapter, root / "model")
    hp = Hyperparameters.model_validate({"model": {"id": str(tiny_model)},
                                         "data": {"train": str(ROOT / "examples/data/medical.jsonl")}})
    (root / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({k: json.dumps(v) for k, v in flatten(hp).items()}))
    (root / "job.json").write_text(json.dumps({"name": name, "status": status}))
    return root


def test_cli_merges_a_local_run_on_this_machine(tiny_model, adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(tmp_path / "runs"))
    fake_local_run(tmp_path / "runs", "tiny-medical-20261129-101500", tiny_model, adapter)
    dest = tmp_path / "merged"
    assert cli(["merge", "tiny-medical-20261129-101500", str(dest), "--output", "json"]) == 0
    out = json.loads(capsys.readouterr().out)  # one JSON object: the merge's own lines went to stderr
    assert out["merged"] == str(dest) and "config.json" in out["files"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dest, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert "tiny-medical-20261129-101500" in (dest / "README.md").read_text()


def test_local_merge_refuses_an_unfinished_run_a_full_destination_and_s3(tiny_model, adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(tmp_path / "runs"))
    fake_local_run(tmp_path / "runs", "tiny-failed", tiny_model, adapter, status="Failed")
    assert cli(["merge", "tiny-failed", str(tmp_path / "m")]) == 1
    fake_local_run(tmp_path / "runs", "tiny-done", tiny_model, adapter)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert cli(["merge", "tiny-done", str(full)]) == 2
    assert cli(["merge", "tiny-done", "s3://my-bucket/merged"]) == 2
    assert not (tmp_path / "m").exists()


def test_the_merge_job_runs_in_the_container_from_its_channels(tiny_model, adapter, tmp_path, monkeypatch):
    """What sm_qlora_merge.py does inside SageMaker: channels in, SM_MODEL_DIR (already there) out."""
    from entrypoint.merge import main

    model_dir, config = tmp_path / "opt-ml-model", tmp_path / "config"
    model_dir.mkdir()
    config.mkdir()
    (config / "hyperparameters.json").write_text(json.dumps({
        "base_model": json.dumps("s3://my-bucket/qlora/uploads/abc/tiny-mixtral"), "adapter_job": json.dumps("j-1"),
        "dtype": json.dumps("fp32"), "sagemaker_program": json.dumps("sm_qlora_merge.py")}))
    for k, v in {"SM_CHANNEL_ADAPTER": adapter, "SM_CHANNEL_MODEL": tiny_model, "SM_MODEL_DIR": model_dir,
                 "SM_INPUT_CONFIG_DIR": config, "SM_OUTPUT_DIR": tmp_path / "output"}.items():
        monkeypatch.setenv(k, str(v))
    # the training toolkit runs `python sm_qlora_merge.py --base_model ...`: those flags are not ours
    monkeypatch.setattr(sys, "argv", ["sm_qlora_merge.py", "--base_model", "x", "--dtype", "fp32"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0
    names = sorted(p.name for p in model_dir.iterdir())
    assert "config.json" in names and not any("partial" in n for n in names)
    assert "base_model: s3://my-bucket/qlora/uploads/abc/tiny-mixtral" in (model_dir / "README.md").read_text()
    monkeypatch.delenv("SM_CHANNEL_ADAPTER")
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "adapter" in (tmp_path / "output" / "failure").read_text()


def test_the_merge_instance_holds_the_base_in_bf16():
    from launcher.merge import choose_instance
    from launcher.shapes import built_in

    shape = built_in("mistralai/Mixtral-8x7B-Instruct-v0.1")
    name, why = choose_instance(shape, "mistralai/Mixtral-8x7B-Instruct-v0.1", None)
    from launcher.instances import catalog

    inst = catalog().get(name)
    assert inst.total_gpu_memory_gib >= 93.4e9 * 1.2 / 2**30  # about 94 GB of bf16 weights, plus 20%
    cheaper = [i for i in catalog().instances.values() if i.price_per_hour < inst.price_per_hour]
    assert all(i.total_gpu_memory_gib < 104 for i in cheaper)
    assert "93 GB" in why and name in why
    assert choose_instance(None, "s3://b/m", "ml.g5.2xlarge")[0] == "ml.g5.2xlarge"


def test_sagemaker_merge_is_a_job_on_the_adapter_jobs_image_and_code(aws, job_dict, monkeypatch):
    """moto over HTTP: the adapter job is created by a real launch; moto reports it Completed
    at once, and accepts the merge job's CreateTrainingJob as SageMaker would receive it."""
    import boto3

    from launcher.job import Job, launch_job

    job = launch_job(job_dict)
    sm = boto3.client("sagemaker")
    adapter_job = sm.describe_training_job(TrainingJobName=job.name)
    result = Job.attach(job.name).merge(None, echo=lambda line: None)
    d = sm.describe_training_job(TrainingJobName=result["merge_job"])
    assert d["AlgorithmSpecification"]["TrainingImage"] == adapter_job["AlgorithmSpecification"]["TrainingImage"]
    assert d["RoleArn"] == adapter_job["RoleArn"]
    hp = d["HyperParameters"]
    assert hp["sagemaker_program"] == '"sm_qlora_merge.py"'
    assert hp["sagemaker_submit_directory"] == adapter_job["HyperParameters"]["sagemaker_submit_directory"]
    assert json.loads(hp["base_model"]) == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert json.loads(hp["adapter_job"]) == job.name
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in d["InputDataConfig"]}
    assert channels == {"adapter": f"s3://my-bucket/qlora/jobs/{job.name}/output/model/"}  # hub base: no model channel
    assert d["OutputDataConfig"]["S3OutputPath"] == f"s3://my-bucket/qlora/merged/{job.name}"
    assert d["ResourceConfig"]["InstanceType"] == result["instance_type"] == "ml.g6e.12xlarge"
    assert d["ResourceConfig"]["InstanceCount"] == 1
    assert result["merged"] == f"s3://my-bucket/qlora/merged/{job.name}/{result['merge_job']}/output/model/"
    assert len(result["merge_job"]) <= 63 and result["merge_job"].startswith(job.name[:40])
    # moto leaves Environment out of DescribeTrainingJob; SageMaker returns it, and the
    # merge job gets the token secret's ARN from it (never the token).
    from launcher.merge import merge_request

    secret = job_dict["aws"]["hf_token_secret"]
    request = merge_request(adapter_job | {"Environment": {"SM_QLORA_HF_TOKEN_SECRET": secret}}, "s3://b/a/",
                            name="m", output="s3://b/o", instance_type="ml.g6e.12xlarge")
    assert request["Environment"]["SM_QLORA_HF_TOKEN_SECRET"] == secret


def test_sagemaker_merge_dry_run_sends_nothing_and_a_local_dest_needs_wait(aws, job_dict, capsys):
    import boto3

    from launcher.job import launch_job

    job = launch_job(job_dict)
    assert cli(["merge", job.name, "--dry-run", "--output", "json", "--instance-type", "ml.p4d.24xlarge"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["request"]["ResourceConfig"]["InstanceType"] == "ml.p4d.24xlarge"
    from tests.e2e.container.service_model import violations

    assert violations(out["request"]) == []  # SageMaker's own limits (botocore's model), which moto skips
    assert cli(["merge", job.name, "./merged-here"]) == 2
    assert cli(["merge", job.name, "--instance-type", "ml.p4d.8xlarge"]) == 2
    jobs = boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"]
    assert [j["TrainingJobName"] for j in jobs] == [job.name]


def test_sagemaker_merge_of_an_s3_base_mounts_it_and_waits_then_downloads(aws, job_dict, tmp_path, monkeypatch):
    import boto3

    from launcher import merge as merge_mod
    from launcher.job import Job, launch_job

    job = launch_job(job_dict, overrides=["model.id=s3://my-bucket/models/Mixtral-8x7B-v0.1"])
    monkeypatch.setattr(merge_mod, "merge_job_name", lambda name: "the-merge")
    merged = f"qlora/merged/{job.name}/the-merge/output/model"
    boto3.client("s3").put_object(Bucket="my-bucket", Key=f"{merged}/config.json", Body=b"{}")
    monkeypatch.setattr("launcher.job.time.sleep", lambda s: None)
    result = Job.attach(job.name).merge(str(tmp_path / "merged"), wait=True, echo=lambda line: None)
    d = boto3.client("sagemaker").describe_training_job(TrainingJobName="the-merge")
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in d["InputDataConfig"]}
    assert channels["model"] == "s3://my-bucket/models/Mixtral-8x7B-v0.1"
    assert (tmp_path / "merged" / "config.json").read_text() == "{}"
    assert result["downloaded_to"] == str(tmp_path / "merged")
