"""Inside the job, the HF token comes from Secrets Manager by ARN (moto over HTTP here) or,
for local runs, from an environment variable the user names; it is never printed."""

from __future__ import annotations

import json
import os

import boto3
import pytest

from entrypoint.train import BadInput, hf_token


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("HF_TOKEN", "SM_QLORA_HF_TOKEN_ENV", "SM_QLORA_HF_TOKEN_SECRET"):
        monkeypatch.delenv(k, raising=False)
    yield monkeypatch
    os.environ.pop("HF_TOKEN", None)


def test_the_token_is_read_from_the_secret_the_launcher_named(aws, clean_env, capsys):
    arn = boto3.client("secretsmanager").create_secret(Name="hf-token", SecretString="hf_plainTOKEN123")["ARN"]
    clean_env.setenv("SM_QLORA_HF_TOKEN_SECRET", arn)
    assert hf_token() == "hf_plainTOKEN123"
    assert os.environ["HF_TOKEN"] == "hf_plainTOKEN123"  # for hub downloads in this process
    out = capsys.readouterr()
    assert "hf_plainTOKEN123" not in out.out + out.err


def test_a_json_secret_with_an_hf_token_key_works_too(aws, clean_env):
    arn = boto3.client("secretsmanager").create_secret(
        Name="hf-json", SecretString=json.dumps({"HF_TOKEN": "hf_fromJSON456"}))["ARN"]
    clean_env.setenv("SM_QLORA_HF_TOKEN_SECRET", arn)
    assert hf_token() == "hf_fromJSON456"


def test_a_missing_secret_stops_the_job_with_a_reason(aws, clean_env):
    clean_env.setenv("SM_QLORA_HF_TOKEN_SECRET", "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope-AbCdEf")
    with pytest.raises(BadInput, match="could not read the HF token secret"):
        hf_token()


def test_local_runs_read_the_variable_the_user_named(clean_env):
    clean_env.setenv("SM_QLORA_HF_TOKEN_ENV", "MY_HF")
    with pytest.raises(BadInput, match="names MY_HF, which is not set"):
        hf_token()
    clean_env.setenv("MY_HF", "hf_local789")
    assert hf_token() == "hf_local789"
