"""compute.image: the HF training image by name or stack; validate and plan know what each
ships and refuse a model the chosen image cannot train; the request names the image."""

from __future__ import annotations

import json

import pytest

from launcher import images
from launcher.config import load_config
from launcher.errors import ConfigError
from launcher.plan import make_plan
from launcher.validate import validate_for_launch


def model_dir(tmp_path, model_type: str, experts: int = 1):
    d = tmp_path / model_type
    d.mkdir()
    config = {"model_type": model_type, "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    if experts > 1:
        config |= {"num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": 128}
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def test_an_image_is_chosen_by_name_by_stack_or_by_tag(job_dict):
    for choice in ("2.9.0-transformers5.3.0", "transformers5",
                   "huggingface-pytorch-training:2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04"):
        assert images.resolve(load_config(job_dict, [f"compute.image={choice}"]).compute.image).transformers == "5.3.0"
    with pytest.raises(ConfigError) as err:
        load_config(job_dict, ["compute.image=transformers6"])
    message = dict(err.value.problems)["compute.image"]
    assert "2.8.0-transformers4.56.2 (transformers4)" in message and "2.9.0-transformers5.3.0 (transformers5)" in message


def test_the_default_is_the_newest_image_measured_on_a_gpu():
    chosen = images.resolve("auto")
    assert chosen.measured_on_gpu
    assert all(not i.measured_on_gpu for i in images.IMAGES[images.IMAGES.index(chosen) + 1:])


def test_auto_takes_the_newest_measured_image_that_can_train_the_model(job_dict, tmp_path):
    def auto(model_id):
        return images.for_job(load_config(job_dict, [f"model.id={model_id}"])).stack

    assert auto("mistralai/Mixtral-8x7B-Instruct-v0.1") == "transformers5"  # built-in shape, experts quantized there
    assert auto(model_dir(tmp_path, "qwen3_next")) == "transformers5"  # 4.56.2 lacks the type
    # an MoE whose experts only transformers 4 quantizes goes there, and validate passes it
    olmoe = load_config(job_dict, [f"model.id={model_dir(tmp_path, 'olmoe', experts=8)}"])
    assert images.for_job(olmoe).stack == "transformers4" and validate_for_launch(olmoe)
    # a model the launcher cannot see offline may be an MoE only transformers 4 quantizes: 4.56.2,
    # which trains every model type transformers 4.56 has
    assert auto("some-org/not-built-in") == "transformers4"
    # the stock MoE path (training.fused_moe: false) exists only on transformers 4: auto goes there,
    # and a transformers 5 image named with it is refused in one line
    stock = load_config(job_dict, ["training.fused_moe=false"])
    assert images.for_job(stock).stack == "transformers4" and validate_for_launch(stock)
    with pytest.raises(ConfigError) as err:
        validate_for_launch(load_config(job_dict, ["training.fused_moe=false", "compute.image=transformers5"]))
    assert "training.fused_moe: false" in dict(err.value.problems)["compute.image"]
    # a named image is taken as named, even where auto would choose another
    pinned = load_config(job_dict, [f"model.id={tmp_path / 'olmoe'}", "compute.image=transformers5"])
    assert images.for_job(pinned).stack == "transformers5"


def test_volta_gets_the_cuda_12_image_and_the_cuda_13_one_is_refused_there(job_dict):
    """The 5.3.0 image's torch is a CUDA 13 build, which has no kernels for V100 (ml.p3*): auto
    picks the 4.56.2 image there, and naming transformers5 is refused in one line before anything
    is sent."""
    for instance in ("ml.p3dn.24xlarge", "ml.p3.8xlarge"):
        volta = load_config(job_dict, [f"compute.instance_type={instance}"])
        assert images.for_job(volta).stack == "transformers4" and validate_for_launch(volta)
        with pytest.raises(ConfigError) as err:
            validate_for_launch(load_config(job_dict, [f"compute.instance_type={instance}",
                                                       "compute.image=transformers5"]))
        assert "compute capability 7.0" in dict(err.value.problems)["compute.image"]
    turing = load_config(job_dict, ["compute.instance_type=ml.g4dn.12xlarge", "compute.image=transformers5"])
    assert validate_for_launch(turing)  # T4 (7.5) is in CUDA 13


def test_validate_refuses_a_model_the_chosen_image_cannot_train(job_dict, tmp_path):
    newer = load_config(job_dict, [f"model.id={model_dir(tmp_path, 'qwen3_next')}", "compute.image=transformers4"])
    with pytest.raises(ConfigError) as err:
        validate_for_launch(newer)
    assert "needs transformers 5" in dict(err.value.problems)["compute.image"]
    moe = load_config(job_dict, [f"model.id={model_dir(tmp_path, 'olmoe', experts=8)}", "compute.image=transformers5"])
    with pytest.raises(ConfigError) as err:
        validate_for_launch(moe)
    assert "does not quantize" in dict(err.value.problems)["compute.image"]
    # the same MoE on the transformers 4 image, and Mixtral on either, are fine
    assert validate_for_launch(load_config(job_dict, [f"model.id={tmp_path / 'olmoe'}", "compute.image=transformers4"]))
    qwen3 = load_config(job_dict, ["model.id=Qwen/Qwen3-30B-A3B", "compute.image=transformers5",
                                   "compute.instance_type=ml.p4de.24xlarge"])
    assert validate_for_launch(qwen3)  # its experts are quantized by the job on transformers 5 too
    for stack in ("transformers4", "transformers5"):
        assert validate_for_launch(load_config(job_dict, [f"compute.image={stack}"]))


def test_the_plan_names_the_image_and_what_it_ships(job_dict):
    plan = make_plan(load_config(job_dict, ["compute.image=transformers5"]), dataset_tokens=1e6, network=False)
    assert "2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04" in plan.image
    assert "transformers 5.3.0, peft 0.18.1, torch 2.9.0" in plan.as_dict()["image"]
