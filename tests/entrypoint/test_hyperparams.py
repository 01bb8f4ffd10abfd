"""The hyperparameters survive SageMaker's flat string map both ways."""

import json

from entrypoint.hyperparams import Hyperparameters, flatten, unflatten


def sample() -> Hyperparameters:
    return Hyperparameters.model_validate({
        "model": {"id": "mistralai/Mixtral-8x7B-Instruct-v0.1"},
        "data": {"train": "s3://b/k/medical.jsonl", "columns": {"prompt": "question", "response": "answer"}},
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"learning_rate": 1e-4, "max_steps": 10},
    })


def test_round_trip_through_the_estimators_json_encoding():
    hp = sample()
    encoded = {k: json.dumps(v) for k, v in flatten(hp).items()}  # what hyperparameters.json holds
    encoded |= {"sagemaker_program": '"sm_qlora_entry.py"', "sagemaker_region": '"us-east-1"'}
    assert Hyperparameters.model_validate(unflatten(encoded)) == hp


def test_round_trip_through_sm_hps_decoded_values():
    hp = sample()
    assert Hyperparameters.model_validate(unflatten(flatten(hp), encoded=False)) == hp


def test_keys_are_dotted_paths():
    flat = flatten(sample())
    assert flat["lora.r"] == 8 and flat["data.columns.prompt"] == "question"
    assert flat["lora.target_modules"] == ["q_proj", "v_proj"]
    assert "training.max_steps" in flat and "data.validation" not in flat  # None is left out
