"""compute.max_cost_usd: a cap the plan, validate, the request, the job and status all honour."""

from __future__ import annotations

import json

import pytest

from launcher.cli import main
from launcher.job import launch_job
from launcher.logs import cost_so_far

P4D_PER_HOUR = 37.688  # launcher/instances.yaml, on demand, one ml.p4d.24xlarge


def write(tmp_path, job_dict, **compute) -> str:
    job_dict["compute"] = job_dict.get("compute", {}) | compute
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job_dict))
    return str(path)


def test_a_cap_below_the_plans_estimate_is_refused_naming_both(job_dict, tmp_path, capsys):
    # a cap that leaves time to train (over start-up + 15 min: $18.84 here), but not 1000 epochs
    job_dict["training"] = job_dict.get("training", {}) | {"epochs": 1000}
    config = write(tmp_path, job_dict, max_cost_usd=20)
    assert main(["validate", config]) == 2
    err = capsys.readouterr().err
    assert "compute.max_cost_usd: the plan estimates $" in err and "above the cap $20.00" in err
    assert main(["launch", config, "--dry-run"]) == 2  # launch refuses the same config, nothing sent


def test_plan_shows_the_cap_beside_the_estimate(job_dict, tmp_path, capsys):
    config = write(tmp_path, job_dict, max_cost_usd=500)
    assert main(["plan", config, "--output", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["max_cost_usd"] == 500
    assert plan["max_runtime_hours"] == pytest.approx(500 / P4D_PER_HOUR, abs=1e-3)
    assert main(["plan", config]) == 0
    assert "budget: $500 cap -> MaxRuntime 13.3 h on ml.p4d.24xlarge x1 (estimate $" in capsys.readouterr().out


def test_the_cap_becomes_max_runtime_and_the_job_is_told(aws, job_dict):
    job_dict["compute"] = job_dict.get("compute", {}) | {"max_cost_usd": 500, "spot": True, "max_run_hours": 48}
    request = launch_job(job_dict, dry_run=True).request
    seconds = int(500 / P4D_PER_HOUR * 3600)
    assert request["StoppingCondition"]["MaxRuntimeInSeconds"] == seconds
    assert request["StoppingCondition"]["MaxWaitTimeInSeconds"] >= seconds
    # the job stops itself (checkpoint + adapter) before SageMaker's MaxRuntime stop
    assert request["Environment"]["SM_QLORA_MAX_RUNTIME_S"] == str(seconds)


def test_without_a_cap_max_run_hours_is_the_runtime_the_job_plans_for(aws, job_dict):
    job_dict["compute"] = job_dict.get("compute", {}) | {"max_run_hours": 2}
    request = launch_job(job_dict, dry_run=True).request
    assert request["StoppingCondition"]["MaxRuntimeInSeconds"] == 7200
    assert request["Environment"]["SM_QLORA_MAX_RUNTIME_S"] == "7200"


def test_status_shows_the_money_spent_against_the_most_the_job_can_cost():
    desc = {"ResourceConfig": {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 1},
            "StoppingCondition": {"MaxRuntimeInSeconds": 36000},
            "TrainingStartTime": 1000.0, "TrainingEndTime": 4600.0}
    cost = cost_so_far(desc)
    assert cost["usd"] == pytest.approx(P4D_PER_HOUR, abs=0.01)
    assert cost["max_usd"] == pytest.approx(10 * P4D_PER_HOUR, abs=0.01)


def test_status_prints_the_money_spent_of_at_most_the_cap(aws, monkeypatch, capsys):
    """A job InProgress for an hour with MaxRuntime 10 h (moto cannot show one running:
    botocore's Stubber answers DescribeTrainingJob; the CloudWatch log group is moto's, empty)."""
    import boto3
    from botocore.stub import Stubber

    from launcher.sagemaker_job import SageMakerBackend
    from tests.e2e.test_follow import NAME, describe_response, expect_describe

    sm = boto3.client("sagemaker")
    monkeypatch.setattr(SageMakerBackend, "_sm", lambda self: sm)
    with Stubber(sm) as stub:
        expect_describe(stub, describe_response("InProgress", "Training",
                                                StoppingCondition={"MaxRuntimeInSeconds": 36000}))
        assert main(["status", NAME, "--region", "us-east-1"]) == 0
    out = capsys.readouterr().out
    import re

    assert re.search(r"cost so far: \$37\.[67]\d of at most \$377 \(MaxRuntime\)", out), out
