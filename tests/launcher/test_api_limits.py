"""`validate` refuses what SageMaker's CreateTrainingJob would refuse, naming the config field,
before anything is uploaded; and it passes only requests that botocore's model accepts.

The oracle is independent of launcher/api_limits.py's checks: botocore's ParamValidator and
tests/e2e/container/service_model.py's maximums and patterns, applied to the request that
submit sends. validate builds that request without the SDK (`preview_request`); the first
tests hold it equal to the SDK's real dry-run request.
"""

from __future__ import annotations

import copy
import functools
import re
from datetime import timedelta

import pytest
from botocore.validate import validate_parameters
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from launcher import images
from launcher.api_limits import preview_request
from launcher.config import load_config
from launcher.errors import ConfigError
from launcher.instances import catalog
from launcher.job import launch_job
from launcher.plan import budget_runtime_s, choose_strategy, micro_batch_rows
from launcher.submit import REDACTED
from launcher.validate import validate_for_launch
from tests.e2e.container.service_model import violations


def refused(job_dict: dict, *overrides: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        validate_for_launch(load_config(job_dict, list(overrides)))
    return dict(info.value.problems)


def _normal(request: dict) -> dict:
    """Content hashes and the launch second are the only parts that differ run to run."""
    text = repr(request)
    text = re.sub(r"/uploads/[0-9a-f]{16}/", "/uploads/HASH/", text)
    return eval(re.sub(r"-\d{8}-\d{6}", "-TIMESTAMP", text))  # noqa: S307 (our own repr of plain data)


def _preview(cfg, resume=None) -> dict:
    request, _ = preview_request(cfg, choose_strategy(cfg), micro_batch_rows(cfg, catalog().get(cfg.compute.instance_type)),
                                 budget_runtime_s(cfg), resume)
    env = request["Environment"]
    if "SM_QLORA_HF_TOKEN_SECRET" in env:
        env["SM_QLORA_HF_TOKEN_SECRET"] = REDACTED
    return request


VARIANTS = [
    [],
    ["compute.instance_type=ml.g6e.xlarge", "compute.spot=true", "compute.max_run_hours=3", "aws.hf_token_secret=null"],
    ["compute.instance_type=ml.g5.12xlarge", "compute.strategy=model_parallel", "data.train=s3://my-bucket/d/t.jsonl",
     "data.validation=s3://my-bucket/d/v.jsonl", "compute.max_cost_usd=400", "aws.tags={team: ml, cost-center: '42'}"],
    ["compute.instance_count=2", "data.system_prompt=Vous êtes médecin ٣.", "aws.tags={Équipe: 'ml ٣'}", "model.id=s3://my-bucket/models/mixtral"],
    ["compute.image=transformers5"],
    ["compute.image_uri=123456789012.dkr.ecr.us-east-1.amazonaws.com/mine:1"],
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=["default", "spot-single", "s3-data-budget", "2x-s3-model",
                                                     "transformers5-image", "own-image"])
def test_the_preview_validate_checks_is_the_request_the_dry_run_sends(aws, job_dict, overrides):
    cfg = load_config(job_dict, overrides)
    sent = launch_job(cfg, dry_run=True).request
    if cfg.compute.image_uri is None:  # an HF image: its registry is the SDK's, by region; its tag the config's
        image = sent["AlgorithmSpecification"].pop("TrainingImage")
        assert len(image) < 255 and image.endswith(":" + images.for_job(cfg).tag)
    assert _normal(_preview(cfg)) == _normal(sent)


def test_the_preview_of_a_resume_is_the_dry_runs(aws, job_dict):
    cfg = load_config(job_dict)
    sent = launch_job(cfg, dry_run=True, resume="medical-mixtral-20261101-000000").request
    sent["AlgorithmSpecification"].pop("TrainingImage")
    assert _normal(_preview(cfg, resume="medical-mixtral-20261101-000000")) == _normal(sent)


# What SageMaker refused after the upload, in the words, and what validate says now.
REFUSED = [
    (["compute.max_run_hours=0.0001"], "compute.max_run_hours", "a job needs at least 0.5 h (0.25 h start-up + 15 min"),
    (["data.system_prompt=" + "x" * 3000], "data.system_prompt",
     "is 3002 characters; SageMaker takes 0 to 2500 (CreateTrainingJob HyperParameters['data.system_prompt'])"),
    (["data.system_prompt=" + "é" * 500], "data.system_prompt", "is 3002 characters"),  # \u00e9 is 6 in JSON
    (["aws.tags={cost#center: a}"], "aws.tags.cost#center", "'cost#center' does not match SageMaker's pattern"),
    (["aws.tags={team: 'a\\nb'}"], "aws.tags.team", "does not match SageMaker's pattern"),
    (["aws.tags={sm-qlora:base-job-name: mine}"], "aws.tags.sm-qlora:base-job-name",
     "tag key 'sm-qlora:base-job-name' is given twice (the launcher sets it itself)"),
    (["compute.max_cost_usd=0.01", "data.train=s3://my-bucket/data/train.jsonl"], "compute.max_cost_usd",
     "$0.01 buys 1 s on ml.p4d.24xlarge x1 ($37.69/h); a job needs at least 0.5 h"),
    (["aws.role=arn:aws:iam::123456789012:role/Rölle"], "aws.role", "does not match SageMaker's pattern"),
    (["output.s3_uri=s3://my-bucket/" + "p" * 1000], "output.s3_uri", "SageMaker takes 0 to 1024"),
    (["aws.hf_token_secret=arn:aws:secretsmanager:us-east-1:123456789012:secret:" + "s" * 500],
     "aws.hf_token_secret", "SageMaker takes 0 to 512"),
    (["compute.image_uri=" + "i" * 300], "compute.image_uri", "is 300 characters; SageMaker takes 0 to 255"),
    (["data.train=s3://my-bucket/" + "k" * 1020], "data.train", "SageMaker takes 0 to 1024"),
]


@pytest.mark.parametrize("overrides,field,message", REFUSED, ids=[r[1] + str(i) for i, r in enumerate(REFUSED)])
def test_validate_refuses_what_sagemaker_refuses_naming_the_field(job_dict, overrides, field, message):
    found = refused(job_dict, *overrides)
    assert field in found, found
    assert message in found[field]


def test_a_budget_too_small_for_start_up_is_refused_with_both_numbers_whatever_the_data(job_dict):
    local = refused(job_dict, "compute.max_cost_usd=5")["compute.max_cost_usd"]
    s3 = refused(job_dict, "compute.max_cost_usd=5", "data.train=s3://my-bucket/d.jsonl")["compute.max_cost_usd"]
    assert local == s3 == ("$5.00 buys 8.0 min on ml.p4d.24xlarge x1 ($37.69/h); a job needs at least 0.5 h "
                           "(0.25 h start-up + 15 min of training), $18.84 at this price")
    validate_for_launch(load_config(job_dict, ["compute.max_cost_usd=19", "data.train=s3://my-bucket/d.jsonl"]))


def test_values_at_sagemakers_limits_pass(job_dict):
    # job_name 47 + 16-character suffix = 63; a hyperparameter of exactly 2500 JSON characters;
    # a 128-character key and a 256-character value of Unicode letters, spaces and digits
    tags = {"k" * 128: "v" * 256, "Ünïcode key 1": "välue ٣"}
    cfg = load_config(job_dict | {"job_name": "j" * 47, "aws": job_dict["aws"] | {"tags": tags}},
                      ["data.system_prompt=" + "x" * 2498, "compute.max_run_hours=0.5"])
    assert validate_for_launch(cfg) is cfg


def test_every_problem_of_the_request_is_listed_at_once(job_dict):
    found = refused(job_dict, "aws.tags={cost#center: a}", "data.system_prompt=" + "x" * 3000,
                    "compute.max_run_hours=0.0001")
    assert {"aws.tags.cost#center", "data.system_prompt", "compute.max_run_hours"} <= set(found)


def test_the_limits_are_botocores_own(job_dict):
    """api_limits reads botocore's data file without importing botocore; it must find the
    shapes botocore.session finds."""
    import botocore.session

    from launcher.api_limits import _shapes

    model = botocore.session.get_session().get_service_model("sagemaker")
    for name in ("TrainingJobName", "HyperParameterValue", "TagKey", "TagValue", "TagList", "S3Uri", "RoleArn",
                 "EnvironmentValue", "TrainingInstanceType", "MaxRuntimeInSeconds", "HyperParameters"):
        theirs = model.shape_for(name)
        ours = _shapes()[name]
        assert {k: ours.get(k) for k in ("min", "max", "pattern")} == \
               {k: theirs.metadata.get(k) for k in ("min", "max", "pattern")}, name
        assert ours.get("enum", []) == getattr(theirs, "enum", []), name


def test_a_five_megabyte_job_name_is_refused_fast(job_dict):
    import time

    start = time.perf_counter()
    found = refused(job_dict | {"job_name": "a" * 5_000_000})
    assert time.perf_counter() - start < 2.0
    assert found["job_name"].startswith("is 5000000 characters; at most 47")


@pytest.mark.parametrize("value", ["", None])
def test_an_empty_job_name_is_one_clear_line(job_dict, value):
    with pytest.raises(ConfigError) as info:
        load_config(job_dict | {"job_name": value})
    assert info.value.exit_code == 2
    assert dict(info.value.problems)["job_name"].startswith("is empty; name the job")


# --------------------------------------------------------------------------- the property

EDGE = settings(max_examples=150, deadline=timedelta(seconds=10),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Characters around SageMaker's patterns: allowed ones, near misses, Unicode letters, digits and
# spaces, and line breaks.
CHARS = st.sampled_from("aZ09 _.:/=+-@#%&é٣\u2003\n\t*,")


def _text(lo: int, hi: int):
    return st.text(CHARS, min_size=lo, max_size=hi)


@st.composite
def configs(draw) -> dict[str, dict]:
    """Config changes at the API's edges, by section: lengths around each maximum, characters
    around each pattern, runtimes and budgets around the floor and MaxRuntime's minimum."""
    top: dict = {}
    changes = {"aws": {}, "compute": {}, "data": {}, "output": {}}

    def some() -> bool:  # about two changes an example, so that most reach validate
        return draw(st.integers(0, 3)) == 0
    if some():
        top["job_name"] = draw(st.text(st.sampled_from("ab9-"), min_size=1, max_size=50))
    if draw(st.booleans()):
        tags = draw(st.dictionaries(_text(1, 130), _text(0, 258), max_size=4))
        if some():
            tags["sm-qlora:config-sha256"] = "x"
        changes["aws"]["tags"] = tags
    if some():
        changes["data"]["system_prompt"] = draw(_text(2400, 2600))
    if some():
        changes["output"]["s3_uri"] = "s3://my-bucket/" + "p" * draw(st.integers(900, 1020))
    if some():
        changes["aws"]["role"] = "arn:aws:iam::123456789012:role/" + draw(_text(1, 30))
    if some():
        changes["compute"]["max_run_hours"] = draw(st.floats(1e-6, 2.0))
    if some():
        changes["data"]["train"] = "s3://my-bucket/d.jsonl"
        changes["compute"]["max_cost_usd"] = draw(st.floats(1e-4, 40.0))
    if some():
        changes["aws"]["hf_token_secret"] = ("arn:aws:secretsmanager:us-east-1:123456789012:secret:"
                                             + "s" * draw(st.integers(440, 460)))
    return top | {k: v for k, v in changes.items() if v}


def _with(job_dict: dict, changes: dict) -> dict:
    cfg = copy.deepcopy(job_dict)
    for key, value in changes.items():
        cfg[key] = cfg[key] | value if isinstance(value, dict) else value
    return cfg


@EDGE
@example({"aws": {"tags": {"cost#center": "a"}}})
@example({"aws": {"tags": {"sm-qlora:base-job-name": "a"}}})
@example({"data": {"system_prompt": "x" * 2499}})
@example({"compute": {"max_run_hours": 0.0001}})
@example({"data": {"train": "s3://my-bucket/d.jsonl"}, "compute": {"max_cost_usd": 0.01}})
@given(changes=configs())
def test_validate_passes_only_requests_botocores_model_accepts(job_dict, changes):
    try:
        cfg = load_config(_with(job_dict, changes))
    except ConfigError:
        event("refused by the config model")
        assume(False)  # the config model's own rules: not what this test is about
    try:
        validate_for_launch(cfg)
    except ConfigError:
        event("refused by validate")
        return  # refused before any upload: SageMaker is never asked
    event("passed validate")
    # the request submit would send (held equal to the SDK's dry run above) must pass botocore's
    # ParamValidator and the model's maximums and patterns, which ParamValidator leaves out
    request, _ = preview_request(cfg, choose_strategy(cfg), micro_batch_rows(cfg, catalog().get(
        cfg.compute.instance_type)), budget_runtime_s(cfg))
    validate_parameters(request, _create_training_job())
    assert violations(request) == []
    keys = [t["Key"] for t in request["Tags"]]
    assert len(keys) == len(set(keys)), keys


@functools.cache
def _create_training_job():
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker").operation_model("CreateTrainingJob").input_shape
