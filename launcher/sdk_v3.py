"""SageMaker SDK 3.x: the job through `sagemaker.train.ModelTrainer`, sending the request
sdk_v2.py sends through v2's HuggingFace Estimator, field for field.

ModelTrainer builds the request (`_create_training_job_args(boto3=True)`, the dict its own
`train()` and pipeline steps send) from the image, role, compute, stopping condition, output,
checkpoint config, environment, hyperparameters, tags, metric definitions and channels. It
cannot express four fields, which are set on that dict here before boto3 sends it (checked
against botocore's service model like every request, tests/e2e/container/service_model.py):
- AlgorithmSpecification.ContainerEntrypoint: ModelTrainer sets one only for its own driver
  (`SourceCode`), which replaces the sagemaker-training toolkit the HF image starts with;
- AlgorithmSpecification.EnableSageMakerMetricsTimeSeries: v2 turns it on with metric definitions;
- TrainingJobName: it always appends its own suffix to `base_job_name`;
- ProfilerConfig: it has no profiler setting; v2 sends `DisableProfiler`.
Two it adds are written v2's way: channels without InputMode (the default, "File") and no
EnableManagedSpotTraining=false on on-demand jobs. `_create_training_job_args` is private; the
CI venv pins 3.27.0 and tests/e2e/test_sdk_majors.py fails the day a 3.x changes what it returns.
The hyperparameters are the toolkit's, as v2 writes them: every value JSON-encoded (ModelTrainer
leaves strings bare, so it gets them encoded already) plus the toolkit's own `sagemaker_*` keys
that v2's Framework adds, because the container runs the same toolkit either way.
"""

from __future__ import annotations

import contextlib
import os

from launcher.job_spec import (
    PY_VERSION,
    PYTORCH_VERSION,
    TRANSFORMERS_VERSION,
    JobSpec,
    quiet_sdk_logging,
    toolkit_hyperparameters,
    training_image,
)

TELEMETRY_OFF = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}


def known_image_uri(region: str, instance_type: str) -> str:
    """The SDK's URI of the HF image both majors know (job_spec.KNOWN) in `region`; ValueError
    where it is not published."""
    quiet_sdk_logging()  # importing the SDK logs its config lookup to stdout otherwise
    from sagemaker.core import image_uris

    return image_uris.retrieve(
        framework="huggingface", region=region, version=TRANSFORMERS_VERSION, py_version=PY_VERSION,
        base_framework_version=f"pytorch{PYTORCH_VERSION}", instance_type=instance_type,
        image_scope="training")


def image_uri(spec: JobSpec) -> str:
    """v3's table has newer images too; the tag in KNOWN's registry keeps the request v2's."""
    def known() -> str:
        return known_image_uri(spec.region, spec.instance_type)

    return training_image(spec, known) or known()


@contextlib.contextmanager
def _no_role_check():
    """ModelTrainer checks the role through IAM (SimulatePrincipalPolicy, GetRole) before it
    builds anything. v2 never did, `sm-qlora preflight` makes the same checks when asked, and a
    dry run must send nothing: SAGEMAKER_VALIDATE_ROLE=false (sagemaker-core 2.x) turns it off."""
    saved = os.environ.get("SAGEMAKER_VALIDATE_ROLE")
    os.environ["SAGEMAKER_VALIDATE_ROLE"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SAGEMAKER_VALIDATE_ROLE", None)
        else:
            os.environ["SAGEMAKER_VALIDATE_ROLE"] = saved


def request(spec: JobSpec, boto_sess) -> dict:
    """The CreateTrainingJob parameters, as boto3 takes them."""
    from sagemaker.core.shapes import Channel, DataSource, S3DataSource

    with _no_role_check():
        trainer = _trainer(spec, boto_sess)
    # Channels as v2 writes them: no InputMode (ModelTrainer's InputData adds "File", the default)
    channels = [Channel(channel_name=k, data_source=DataSource(s3_data_source=S3DataSource(
        s3_data_type="S3Prefix", s3_uri=v, s3_data_distribution_type="FullyReplicated"))) for k, v in spec.inputs.items()]
    args = trainer._create_training_job_args(input_data_config=channels, boto3=True)
    args["TrainingJobName"] = spec.name
    args["AlgorithmSpecification"] |= {"ContainerEntrypoint": spec.container_entry_point,
                                       "EnableSageMakerMetricsTimeSeries": True}
    args["ProfilerConfig"] = {"DisableProfiler": True}
    if spec.max_wait_s is None:
        args.pop("EnableManagedSpotTraining", None)  # v2 leaves the default (false) out
    return args


def _trainer(spec: JobSpec, boto_sess):
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.shapes import MetricDefinition, Tag
    from sagemaker.core.training.configs import CheckpointConfig, Compute, OutputDataConfig, StoppingCondition
    from sagemaker.train import ModelTrainer

    trainer = ModelTrainer(
        training_image=image_uri(spec),
        role=spec.role,
        base_job_name=spec.name,
        sagemaker_session=Session(boto_session=boto_sess, default_bucket=spec.bucket,
                                  sagemaker_config=TELEMETRY_OFF),
        compute=Compute(instance_type=spec.instance_type, instance_count=spec.instance_count,
                        volume_size_in_gb=spec.volume_size_gb,
                        enable_managed_spot_training=spec.max_wait_s is not None),
        stopping_condition=StoppingCondition(max_runtime_in_seconds=spec.max_run_s,
                                             max_wait_time_in_seconds=spec.max_wait_s),
        output_data_config=OutputDataConfig(s3_output_path=spec.output_path, compression_type="NONE"),
        checkpoint_config=CheckpointConfig(s3_uri=spec.checkpoint_s3_uri, local_path=spec.checkpoint_local_path),
        environment=spec.environment,
        hyperparameters=toolkit_hyperparameters(  # as v2 sends them: the container sees the same
            spec.hyperparameters, source_dir=spec.source_dir, entry_script=spec.entry_script, name=spec.name,
            region=spec.region, instance_type=spec.instance_type, distributed=spec.distributed),
        tags=[Tag(key=t["Key"], value=t["Value"]) for t in spec.tags],
    )
    return trainer.with_metric_definitions(
        [MetricDefinition(name=m["Name"], regex=m["Regex"]) for m in spec.metric_definitions])


def create_training_job(spec: JobSpec, boto_sess) -> None:
    """CreateTrainingJob with ModelTrainer's request, on `boto_sess`'s clients."""
    quiet_sdk_logging()
    boto_sess.client("sagemaker").create_training_job(**request(spec, boto_sess))
