"""What a SageMaker training job is, in the launcher's own terms: the one input of both SDK
adapters (launcher/sdk_v2.py, launcher/sdk_v3.py), each of which turns it into the same
CreateTrainingJob request. Nothing here imports an SDK."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from launcher.images import IMAGES, Image

# The HF PyTorch training image both SDK majors know (v2's table stops at transformers 4.56.2):
# a newer image (launcher.images) is named by URI, its tag in this image's registry (the same DLC
# account in every region), so that both majors send the same TrainingImage.
KNOWN = IMAGES[0]
PYTORCH_VERSION = KNOWN.torch
TRANSFORMERS_VERSION = KNOWN.transformers
PY_VERSION = KNOWN.py


@dataclass(frozen=True)
class JobSpec:
    name: str
    region: str
    role: str
    bucket: str  # output.s3_uri's bucket: an SDK session never derives one through STS
    image_uri: str | None  # compute.image_uri, an own image; None: `image` below
    image: Image  # compute.image: the HF training image (launcher.images)
    instance_type: str
    instance_count: int
    volume_size_gb: int
    max_run_s: int
    max_wait_s: int | None  # set only for spot jobs
    source_dir: str  # s3:// URI of sourcedir.tar.gz, uploaded by submit
    entry_script: str
    hyperparameters: dict[str, Any]  # the job's own, not yet JSON-encoded; the SDK adds the toolkit's
    distributed: bool  # one process per GPU through torchrun
    environment: dict[str, str]
    output_path: str
    checkpoint_s3_uri: str
    checkpoint_local_path: str
    metric_definitions: list[dict[str, str]]
    tags: list[dict[str, str]]
    inputs: dict[str, str]  # channel name -> s3:// URI
    container_entry_point: list[str]


def quiet_sdk_logging() -> None:
    """Both SDK majors log INFO to stdout unless their logger already has a handler; stdout
    is for results (`--output json` must be one object), so send their warnings to stderr."""
    import logging
    import sys

    sm_logger = logging.getLogger("sagemaker")
    if not sm_logger.handlers:
        sm_logger.addHandler(logging.StreamHandler(sys.stderr))
    sm_logger.setLevel(logging.WARNING)
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)
    if not any(f is _no_troubleshooting_link for f in sm_logger.filters):
        sm_logger.addFilter(_no_troubleshooting_link)


def _no_troubleshooting_link(record) -> bool:
    """The SDK logs a link of its own beside every refused CreateTrainingJob; the refusal
    itself reaches the user once, as our AWSError with its hint."""
    return not str(record.msg).startswith("Please check the troubleshooting guide")


def training_image(spec: JobSpec, known_uri) -> str | None:
    """TrainingImage where the SDK cannot name it from its own table: an own image, or an HF image
    newer than KNOWN (its tag in KNOWN's registry; `known_uri()` is the SDK's URI for KNOWN).
    None: the SDK names KNOWN itself."""
    if spec.image_uri:
        return spec.image_uri
    if spec.image == KNOWN:
        return None
    return f"{known_uri().rsplit(':', 1)[0]}:{spec.image.tag}"


def toolkit_hyperparameters(hyperparameters: dict[str, Any], *, source_dir: str, entry_script: str, name: str,
                            region: str, instance_type: str, distributed: bool) -> dict[str, str]:
    """What v2's Framework estimator sends: the job's own values and the toolkit's keys, each
    JSON-encoded (the toolkit decodes them into SM_HPS and hyperparameters.json). sdk_v3 sends
    this, and validate's preview (api_limits) checks it."""
    toolkit = {
        "sagemaker_submit_directory": source_dir,
        "sagemaker_program": entry_script,
        "sagemaker_container_log_level": logging.INFO,
        "sagemaker_job_name": name,
        "sagemaker_region": region,
    }
    if distributed:  # the SDK's keys for distribution={"torch_distributed": ...}
        toolkit |= {"sagemaker_torch_distributed_enabled": True, "sagemaker_instance_type": instance_type}
    return {k: json.dumps(v) for k, v in (hyperparameters | toolkit).items()}
