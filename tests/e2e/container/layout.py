"""/opt/ml as SageMaker lays it out for a training container, from the CreateTrainingJob
request the launcher sent (to moto): the three config files, each data channel downloaded
from S3, empty model/ and output/, and checkpoints/ (restored from checkpoint_s3_uri on a
spot restart). The source dir is not laid out: the toolkit downloads it itself.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST = "algo-1"
# The HF training image's environment (Dockerfile ENV) and default command.
IMAGE_ENV = {"SAGEMAKER_TRAINING_MODULE": "sagemaker_pytorch_container.training:main"}
IMAGE_COMMAND = ["bash", "-m", "start_with_right_hostname.sh", "train"]


def container_command(request: dict) -> list[str]:
    """What SageMaker starts as PID 1: ContainerEntrypoint + ContainerArguments when the
    request sets them, else the image's own ENTRYPOINT and `train`."""
    algo = request["AlgorithmSpecification"]
    if "ContainerEntrypoint" in algo or "ContainerArguments" in algo:
        return list(algo.get("ContainerEntrypoint", IMAGE_COMMAND[:-1])) + list(algo.get("ContainerArguments", []))
    return list(IMAGE_COMMAND)


def lay_out(request: dict, root: Path, *, extra_hyperparameters: dict | None = None,
            checkpoints: Path | None = None) -> Path:
    """root/opt/ml for this request; returns root/opt (what the container sees as /opt)."""
    import boto3

    ml = root / "opt" / "ml"
    config = ml / "input" / "config"
    config.mkdir(parents=True)
    for sub in ("model", "output", "code"):
        (ml / sub).mkdir()
    # SageMaker writes the request's map as it came: the SDK has JSON-encoded each value.
    (config / "hyperparameters.json").write_text(json.dumps(request["HyperParameters"] | (extra_hyperparameters or {})))
    instance = request["ResourceConfig"]["InstanceType"]
    (config / "resourceconfig.json").write_text(json.dumps({
        "current_host": HOST, "hosts": [HOST], "current_instance_type": instance,
        "current_group_name": "homogeneousCluster", "network_interface_name": "eth0",
        "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": instance, "hosts": [HOST]}],
    }))
    channels = {}
    s3 = boto3.client("s3")
    for ch in request.get("InputDataConfig", []):
        src = ch["DataSource"]["S3DataSource"]
        channels[ch["ChannelName"]] = {"TrainingInputMode": request["AlgorithmSpecification"]["TrainingInputMode"],
                                       "S3DistributionType": src.get("S3DataDistributionType", "FullyReplicated"),
                                       "RecordWrapperType": "None"}
        bucket, prefix = src["S3Uri"][len("s3://"):].split("/", 1)
        dest = ml / "input" / "data" / ch["ChannelName"]
        dest.mkdir(parents=True)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):].lstrip("/") or obj["Key"].rsplit("/", 1)[-1]
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(dest / rel))
    (config / "inputdataconfig.json").write_text(json.dumps(channels))
    if checkpoints is not None:
        shutil.copytree(checkpoints, ml / "checkpoints")
    else:
        (ml / "checkpoints").mkdir()
    return root / "opt"


def container_env(request: dict, root: Path, aws_env: dict[str, str], gpus: int) -> dict[str, str]:
    """The container's environment: the image's, SageMaker's, the request's; plus what
    stands in for the image here: the venv's python, `train` and torchrun, the start
    script, and an `nvidia-smi` that reports `gpus` GPUs. No PYTHONPATH: the job's code
    comes from the source dir the toolkit downloads, not from this checkout."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shutil.copy(HERE / "start_with_right_hostname.sh", bin_dir)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f'echo "GPU {i}: NVIDIA H200 (UUID: GPU-{i})"\n' for i in range(gpus)))
    smi.chmod(0o755)
    name = request["TrainingJobName"]
    return {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(root), "LANG": "C.UTF-8",
        **IMAGE_ENV,
        "TRAINING_JOB_NAME": name,
        "TRAINING_JOB_ARN": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{name}",
        **aws_env,
        # No internet in the container: pip may use only what is installed, the hub nothing.
        "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **request.get("Environment", {}),
    }
