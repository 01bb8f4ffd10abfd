"""The hyperparameters survive SageMaker's flat string map both ways."""

import json

import pytest
from pydantic import ValidationError

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


def reserved_names() -> list[str]:
    """Every hyperparameter name the training toolkit reserves: its lower-case string
    constants (the upper-case ones are environment variable names)."""
    import sagemaker_training.params as params

    names = {v for k, v in vars(params).items() if isinstance(v, str) and not k.startswith("__") and v == v.lower()}
    names |= set(params.SAGEMAKER_HYPERPARAMETERS)
    assert "_tuning_objective_metric" in names and "sagemaker_program" in names
    return sorted(names)


def test_every_reserved_hyperparameter_of_the_toolkit_is_accepted_and_ignored():
    hp = sample()
    encoded = {k: json.dumps(v) for k, v in flatten(hp).items()}
    for name in reserved_names():
        encoded[name] = json.dumps("x")
    # a tuning job's objective metric arrives as a plain string, not JSON-encoded
    encoded["_tuning_objective_metric"] = "eval:loss"
    assert Hyperparameters.model_validate(unflatten(encoded)) == hp
    assert Hyperparameters.model_validate(unflatten(flatten(hp) | dict.fromkeys(reserved_names(), "x"),
                                                    encoded=False)) == hp


def test_an_unknown_key_is_still_an_error():
    with pytest.raises(ValidationError, match="lora.rank"):
        Hyperparameters.model_validate(unflatten({**flatten(sample()), "lora.rank": 4}, encoded=False))


@pytest.mark.parametrize("key,value", [
    ("lora.alpha", float("inf")), ("lora.alpha", float("nan")), ("training.learning_rate", float("nan")),
    ("training.weight_decay", float("inf")), ("training.max_grad_norm", float("inf")),
    ("training.seed", 2**32), ("training.seed", -1), ("training.checkpoint_minutes", 0),
])
def test_values_that_would_train_nan_or_crash_the_job_are_refused(key, value):
    flat = flatten(sample()) | {key: value}
    with pytest.raises(ValidationError, match=key.split(".")[-1]):
        Hyperparameters.model_validate(unflatten(flat, encoded=False))


def test_inf_written_as_yaml_or_json_text_is_refused_too():
    encoded = {k: json.dumps(v) for k, v in flatten(sample()).items()} | {"lora.alpha": "Infinity"}
    with pytest.raises(ValidationError, match="alpha"):
        Hyperparameters.model_validate(unflatten(encoded))


def test_the_largest_seed_and_a_fractional_clock_are_fine():
    hp = Hyperparameters.model_validate(unflatten(
        flatten(sample()) | {"training.seed": 2**32 - 1, "training.checkpoint_minutes": 0.001}, encoded=False))
    assert hp.training.seed == 2**32 - 1 and hp.training.checkpoint_minutes == 0.001
    assert sample().training.checkpoint_minutes == 30  # SPEC's default
