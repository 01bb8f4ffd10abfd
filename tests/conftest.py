"""Shared fixtures: a moto server on a loopback port (a real HTTP endpoint that boto3 and
the SageMaker SDK reach through AWS_ENDPOINT_URL), the tiny model, and configs."""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny-mixtral"
DATA = ROOT / "examples" / "data" / "medical.jsonl"


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Tests never reach beyond loopback: the planner's hub lookup stays off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws(moto_endpoint, monkeypatch):
    """Dummy credentials, every client pointed at moto, a fresh moto state, one bucket."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")).read()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint, "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    from launcher.aws import session

    session.cache_clear()
    import boto3

    boto3.client("s3").create_bucket(Bucket="my-bucket")
    yield moto_endpoint
    session.cache_clear()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    if not (TINY / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_model.py"), str(TINY)], check=True)
    return TINY


@pytest.fixture
def job_dict() -> dict:
    return copy.deepcopy(yaml.safe_load((ROOT / "examples" / "job.yaml").read_text()) | {
        "data": {"train": str(DATA), "format": "instruction", "columns": {"prompt": "question", "response": "answer"}}})
