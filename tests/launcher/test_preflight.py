"""`sm-qlora preflight`: each account-side problem is named with its fix, before anything
is paid for.

STS, IAM (GetRole), S3 and Secrets Manager are moto over HTTP (the `aws` fixture). moto
5.2 has neither SageMaker's Service Quotas nor iam:SimulatePrincipalPolicy, so:
- the quota client is a botocore Stubber answering ListServiceQuotas as Service Quotas does;
- SimulatePrincipalPolicy is answered by a Stubber-built IAM client for that one call
  (the rest of IAM stays on moto); without it, the check says "could not check".
"""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.stub import Stubber

from launcher import preflight as pf

SAGEMAKER_TRUST = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecutionRole"


def quota_client(value: float | None, name: str = "ml.p4d.24xlarge for training job usage"):
    c = boto3.client("service-quotas", region_name="us-east-1")
    stub = Stubber(c)
    quotas = [] if value is None else [{"ServiceCode": "sagemaker", "QuotaCode": "L-2E8D9C5E", "QuotaName": name,
                                        "Value": value}]
    for _ in range(3):  # one answer per preflight run in a test
        stub.add_response("list_service_quotas", {"Quotas": quotas}, {"ServiceCode": "sagemaker"})
        if not quotas:  # not among the applied values: preflight looks among the defaults
            stub.add_response("list_aws_default_service_quotas", {"Quotas": []}, {"ServiceCode": "sagemaker"})
    stub.activate()
    return c


def simulating_iam(decision: str):
    """moto's IAM, with SimulatePrincipalPolicy answered by a Stubber on a twin client."""
    real = boto3.client("iam")
    twin = boto3.client("iam")
    stub = Stubber(twin)
    for _ in range(3):
        stub.add_response("simulate_principal_policy", {"EvaluationResults": [
            {"EvalActionName": "iam:PassRole", "EvalResourceName": ROLE, "EvalDecision": decision}]})
    stub.activate()
    real.simulate_principal_policy = twin.simulate_principal_policy
    return real


@pytest.fixture
def account(aws, monkeypatch):
    """A good account: the role trusts SageMaker, the bucket and the secret are in us-east-1,
    the quota is 1, PassRole allowed. Tests break one thing each."""
    boto3.client("iam").create_role(RoleName="SageMakerExecutionRole",
                                    AssumeRolePolicyDocument=json.dumps(SAGEMAKER_TRUST))
    secret = boto3.client("secretsmanager").create_secret(Name="hf-token", SecretString="hf_neverRead")["ARN"]
    state = {"quota": quota_client(1), "iam": simulating_iam("allowed"), "secret": secret}
    real_client = pf.client

    def client(service, region=None, profile=None):
        if service == "service-quotas":
            return state["quota"]
        if service == "iam" and state["iam"] is not None:
            return state["iam"]
        return real_client(service, region, profile)

    monkeypatch.setattr(pf, "client", client)  # preflight's own name for launcher.aws.client
    return state


def config(job_dict, account, **aws) -> dict:
    job_dict["aws"] = job_dict["aws"] | {"hf_token_secret": account["secret"]} | aws
    return job_dict


def run(job_dict) -> tuple[int, dict]:
    from launcher.config import load_config

    checks = pf.preflight(load_config(job_dict))
    return pf.exit_code(checks), {c.name: c for c in checks}


def test_a_good_account_passes_every_check(account, job_dict, tmp_path, capsys):
    job_dict = config(job_dict, account)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job_dict))
    assert cli(["preflight", str(path), "--output", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    assert [c["name"] for c in out["checks"]] == ["credentials", *pf.CHECK_NAMES]
    assert all(c["ok"] is True for c in out["checks"]), out["checks"]
    assert "123456789012" in out["checks"][0]["detail"]
    assert "hf_neverRead" not in json.dumps(out)
    assert cli(["preflight", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.count("[ok  ]") == 7 and "ready to launch" in text


def test_a_missing_role_is_named_with_its_fix(account, job_dict):
    job_dict = config(job_dict, account, role="arn:aws:iam::123456789012:role/NoSuchRole")
    code, checks = run(job_dict)
    assert code == 2
    assert checks["role"].ok is False and "does not exist" in checks["role"].detail
    assert "aws.role" in checks["role"].fix
    assert checks["iam:PassRole"].ok is None  # nothing to simulate against
    assert checks["bucket"].ok is True  # the other checks still ran
    lines: list[str] = []  # `launch --preflight` prints the same lines and stops on the same code
    from launcher.config import load_config

    assert pf.gate(load_config(job_dict), info=lines.append) == 2
    assert any(line.startswith("[FAIL] role:") for line in lines)


def test_a_role_that_trusts_another_service_is_refused(account, job_dict):
    boto3.client("iam").create_role(RoleName="LambdaRole", AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                                                 "Action": "sts:AssumeRole"}]}))
    code, checks = run(config(job_dict, account, role="arn:aws:iam::123456789012:role/LambdaRole"))
    assert code == 2
    trust = checks["role trust"]
    assert trust.ok is False and "lambda.amazonaws.com" in trust.detail
    assert '"Service": "sagemaker.amazonaws.com"' in trust.fix


def test_a_bucket_in_another_region_is_refused(account, job_dict):
    boto3.client("s3", region_name="eu-west-1").create_bucket(
        Bucket="eu-bucket", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    job_dict["output"] = {"s3_uri": "s3://eu-bucket/qlora"}
    code, checks = run(config(job_dict, account))
    assert code == 2
    assert checks["bucket"].ok is False and "eu-west-1" in checks["bucket"].detail
    assert "aws.region: eu-west-1" in checks["bucket"].fix
    job_dict["output"] = {"s3_uri": "s3://no-such-bucket/qlora"}
    code, checks = run(job_dict)
    assert code == 2 and "does not exist" in checks["bucket"].detail


def test_a_missing_secret_or_one_in_another_region_is_refused(account, job_dict):
    missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:gone-AbCdEf"
    code, checks = run(config(job_dict, account, hf_token_secret=missing))
    assert code == 2 and checks["hf token secret"].ok is False and "does not exist" in checks["hf token secret"].detail
    elsewhere = boto3.client("secretsmanager", region_name="eu-west-1").create_secret(
        Name="hf-eu", SecretString="hf_x")["ARN"]
    code, checks = run(config(job_dict, account, hf_token_secret=elsewhere))
    assert code == 2 and "eu-west-1" in checks["hf token secret"].detail
    assert "replicate" in checks["hf token secret"].fix


def test_a_quota_below_the_instance_count_is_refused_with_the_request_command(account, job_dict):
    account["quota"] = quota_client(0)
    code, checks = run(config(job_dict, account))
    assert code == 2
    q = checks["instance quota"]
    assert q.ok is False and "is 0, the job needs 1" in q.detail
    assert "--quota-code L-2E8D9C5E --desired-value 1" in q.fix


def test_a_quota_it_cannot_find_is_could_not_check(account, job_dict):
    account["quota"] = quota_client(None)
    code, checks = run(config(job_dict, account))
    assert code == 0 and checks["instance quota"].ok is None
    assert "ml.p4d.24xlarge for training job usage" in checks["instance quota"].detail


def test_spot_jobs_check_the_spot_quota(account, job_dict):
    account["quota"] = quota_client(2, "ml.p4d.24xlarge for spot training job usage")
    job_dict["compute"] |= {"spot": True, "instance_count": 2}
    code, checks = run(config(job_dict, account))
    assert code == 0 and checks["instance quota"].ok is True and "spot" in checks["instance quota"].detail


def test_pass_role_denied_is_a_problem_and_unsimulatable_is_could_not_check(account, job_dict, capsys, tmp_path):
    account["iam"] = simulating_iam("implicitDeny")
    code, checks = run(config(job_dict, account))
    assert code == 2 and checks["iam:PassRole"].ok is False and "iam:PassRole" in checks["iam:PassRole"].fix
    account["iam"] = None  # moto itself: no SimulatePrincipalPolicy there, like a caller not allowed to call it
    code, checks = run(job_dict)
    assert checks["iam:PassRole"].ok is None and "could not check" in checks["iam:PassRole"].detail
    assert code == 0  # not a reason to refuse the launch
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job_dict))
    assert cli(["preflight", str(path)]) == 0
    assert "[??  ] iam:PassRole" in capsys.readouterr().out


def test_no_credentials_is_exit_3_and_nothing_else_is_tried(aws, job_dict, monkeypatch, tmp_path, capsys):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    from launcher.aws import session

    session.cache_clear()
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job_dict))
    assert cli(["preflight", str(path), "--output", "json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["checks"][0]["ok"] is False and "no AWS credentials" in out["checks"][0]["detail"]
    assert all(c["ok"] is None for c in out["checks"][1:])


def test_a_bad_config_is_exit_2_before_any_aws_call(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("job_name: x\n")
    assert cli(["preflight", str(path)]) == 2


def test_trust_policies_as_the_wire_sends_them():
    encoded = "%7B%22Statement%22%3A%5B%7B%22Effect%22%3A%22Allow%22%2C%22Principal%22%3A%7B%22Service%22%3A%5B%22" \
              "ec2.amazonaws.com%22%2C%22sagemaker.amazonaws.com%22%5D%7D%2C%22Action%22%3A%5B%22sts%3AAssumeRole%22%5D%7D%5D%7D"
    assert pf.trusts_sagemaker(encoded)
    deny = {"Statement": [{"Effect": "Deny", "Principal": {"Service": "sagemaker.amazonaws.com"},
                           "Action": "sts:AssumeRole"}]}
    assert not pf.trusts_sagemaker(deny)
    assert pf.caller_principal({"Arn": "arn:aws:sts::123456789012:assumed-role/Admin/me", "Account": "123456789012"}) \
        == "arn:aws:iam::123456789012:role/Admin"
    assert pf.caller_principal({"Arn": "arn:aws:iam::123456789012:root", "Account": "123456789012"}) is None


def cli(argv: list[str]) -> int:
    """The verb through the real `sm-qlora` entry point."""
    from launcher.cli import main

    return main(argv)
