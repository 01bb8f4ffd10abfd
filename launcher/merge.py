"""`sm-qlora merge JOB DEST`: the base model with the job's adapter merged in, ready to serve.

- Local runs (runs/<job>/model): `python -m entrypoint.merge` on this machine, in a
  subprocess, into DEST.
- SageMaker jobs: the merge runs as its own small training job on the SAME image and
  code as the adapter job. DescribeTrainingJob gives the image
  (AlgorithmSpecification.TrainingImage) and the code tarball (the
  `sagemaker_submit_directory` hyperparameter), so a plain boto3 CreateTrainingJob is
  enough: no SageMaker SDK here. The instance is the cheapest catalog one whose GPUs hold
  the base in bf16 with 20% headroom (Mixtral-8x7B: 93 GB of weights, so >= 104 GiB).
  The merged files land under `<output.s3_uri>/merged/<job>/` (or an s3:// DEST);
  with `--wait` and a local DEST they are downloaded there.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from entrypoint import container
from launcher.aws import client, translated
from launcher.errors import ConfigError, JobFailed
from launcher.instances import catalog
from launcher.sagemaker_job import SageMakerBackend
from launcher.shapes import resolve

MERGE_SCRIPT = container.MERGE_SCRIPT  # submit.code_tarball() ships it
HEADROOM = 1.2  # bf16 weights x 1.2: CUDA context, the LoRA factors and one layer's merge temporaries
MAX_RUNTIME_S = 4 * 3600  # a merge is download + one pass over the weights + upload; this is a runaway guard
DTYPES = ("auto", "bf16", "fp16", "fp32")


def bf16_gib(total_params: int) -> float:
    return total_params * 2 * HEADROOM / 2**30


def choose_instance(shape, model_id: str, fallback: str | None) -> tuple[str, str]:
    """(instance type, why): the cheapest catalog instance whose total GPU memory holds the
    base in bf16 with headroom; the adapter job's own instance when the shape is unknown."""
    if shape is None:
        if fallback is None:
            raise _config_error("--instance-type", f"the shape of {model_id} is unknown; name the merge instance")
        return fallback, f"shape of {model_id} unknown: the adapter job's instance"
    need = bf16_gib(shape.total_params)
    fits = [i for i in catalog().instances.values() if i.total_gpu_memory_gib >= need]
    if not fits:
        raise _config_error("--instance-type", f"no catalog instance holds {need:.0f} GiB of bf16 weights")
    best = min(fits, key=lambda i: (i.price_per_hour, i.name))
    dtype = "bf16" if best.gpu.bf16 else "fp16 (no bf16 on this GPU)"
    return best.name, (f"{shape.name}: {shape.total_params / 1e9:.1f}B params, {shape.total_params * 2 / 1e9:.0f} GB "
                       f"in bf16, x{HEADROOM} = {need:.0f} GiB; {best.name} has {best.total_gpu_memory_gib:.0f} GiB "
                       f"of GPU memory at ${best.price_per_hour:.2f}/h, the cheapest that holds it; writes {dtype}")


def _config_error(path: str, msg: str):
    return ConfigError([(path, msg)])


def _decoded(hyperparameters: dict[str, str]) -> dict[str, Any]:
    from entrypoint.hyperparams import unflatten

    return unflatten(hyperparameters, encoded=True)


def _completed(job) -> dict:

    desc = job.describe()
    if desc["TrainingJobStatus"] != "Completed":
        raise JobFailed(f"job {job.name} is {desc['TrainingJobStatus']}: there is no adapter to merge yet",
                        f"sm-qlora status {job.name}")
    return desc


# --------------------------------------------------------------------------- local runs

def merge_local(job, dest: str | Path, dtype: str = "auto", echo=print, dry_run: bool = False) -> dict[str, Any]:
    """Merge runs/<job>/model into DEST on this machine (a subprocess, so a crash in torch
    leaves this process and DEST clean); a dry run says what it would run and writes nothing."""
    if str(dest).startswith("s3://"):
        raise ConfigError([("DEST", "a local run merges on this machine: give a directory, not an S3 URI")])
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError([("DEST", f"{dest} exists and is not empty; pick a new directory")])
    _completed(job)
    hp = _decoded(json.loads((job.local_dir / "input" / "config" / "hyperparameters.json").read_text()))
    model, data = hp["model"], hp["data"]
    args = [sys.executable, "-m", "entrypoint.merge", "--adapter", str(job.local_dir / "model"),
            "--base", model["id"], "--out", str(dest), "--dtype", dtype, "--adapter-job", job.name,
            "--data", data["train"]]
    if model.get("revision"):
        args += ["--revision", model["revision"]]
    if model.get("trust_remote_code"):
        args.append("--trust-remote-code")
    if dry_run:
        return {"job_name": job.name, "local": True, "dry_run": True, "merged": str(dest), "base_model": model["id"],
                "command": args}
    root = Path(__file__).resolve().parent.parent
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
                        "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reason = None
    for line in proc.stdout:
        echo(line.rstrip("\n"))
        if line.startswith("[error] reason="):
            reason = line.strip()[len("[error] reason="):]
    if proc.wait() != 0:
        if proc.returncode == 2:
            raise ConfigError([("merge", reason or "the merge refused its input")])
        raise JobFailed(f"merge of {job.name} failed (exit {proc.returncode}): {reason or 'see the lines above'}")
    return {"job_name": job.name, "local": True, "merged": str(dest), "base_model": model["id"],
            "files": sorted(p.name for p in dest.iterdir())}


# --------------------------------------------------------------------------- SageMaker jobs

def merge_job_name(job: str) -> str:
    """<job>-merge-HHMMSS within SageMaker's 63 characters."""
    suffix = f"-merge-{time.strftime('%H%M%S', time.gmtime())}"
    return job[: 63 - len(suffix)].rstrip("-") + suffix


def default_output(desc: dict) -> str:
    """<output.s3_uri>/merged/<job>: the adapter job wrote to <output.s3_uri>/jobs."""
    out = desc["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    base = out[: -len("/jobs")] if out.endswith("/jobs") else out
    return f"{base}/merged/{desc['TrainingJobName']}"


def merge_request(desc: dict, adapter_uri: str, *, name: str, output: str, instance_type: str,
                  dtype: str = "auto", params: int | None = None) -> dict[str, Any]:
    """The CreateTrainingJob request of the merge job, from the adapter job's description."""
    raw = desc.get("HyperParameters", {})
    if "sagemaker_submit_directory" not in raw:
        raise ConfigError([("JOB", f"{desc['TrainingJobName']} was not launched by sm-qlora "
                                   "(no sagemaker_submit_directory hyperparameter)")])
    decoded = _decoded(raw)
    model, data = decoded.get("model", {}), decoded.get("data", {})
    model_id = model.get("id", "")
    hps = {"base_model": model_id, "adapter_job": desc["TrainingJobName"], "data": data.get("train"),
           "dtype": dtype, "revision": model.get("revision"), "trust_remote_code": model.get("trust_remote_code")}
    hyperparameters = {k: json.dumps(v) for k, v in hps.items() if v is not None}
    hyperparameters |= {k: raw[k] for k in ("sagemaker_submit_directory", "sagemaker_region",
                                            "sagemaker_container_log_level") if k in raw}
    hyperparameters["sagemaker_program"] = json.dumps(MERGE_SCRIPT)
    channels = {"adapter": adapter_uri} | ({"model": model_id} if model_id.startswith("s3://") else {})
    volume = max(50, math.ceil(params * 2 / 1e9 * 2.5)) if params else 200  # the base in, the merged model out
    env = {"PYTHONUNBUFFERED": "1"}
    secret = desc.get("Environment", {}).get(container.HF_TOKEN_SECRET)
    if secret:
        env[container.HF_TOKEN_SECRET] = secret  # the ARN; the job reads the token itself
    request: dict[str, Any] = {
        "TrainingJobName": name,
        "RoleArn": desc["RoleArn"],
        "AlgorithmSpecification": {"TrainingImage": desc["AlgorithmSpecification"]["TrainingImage"],
                                   "TrainingInputMode": "File"},
        "HyperParameters": hyperparameters,
        "InputDataConfig": [
            {"ChannelName": ch, "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}}
            for ch, uri in channels.items()],
        "OutputDataConfig": {"S3OutputPath": output, "CompressionType": "NONE"},  # files as they are, no tar.gz
        "ResourceConfig": {"InstanceType": instance_type, "InstanceCount": 1, "VolumeSizeInGB": volume},
        "StoppingCondition": {"MaxRuntimeInSeconds": MAX_RUNTIME_S},
        "Environment": env,
        "Tags": [{"Key": "sm-qlora:merged-from", "Value": desc["TrainingJobName"]}],
    }
    for key in ("VpcConfig", "EnableNetworkIsolation", "EnableInterContainerTrafficEncryption"):
        if desc.get(key) is not None:
            request[key] = desc[key]
    if desc["OutputDataConfig"].get("KmsKeyId"):
        request["OutputDataConfig"]["KmsKeyId"] = desc["OutputDataConfig"]["KmsKeyId"]
    return request


def merge_sagemaker(job, dest: str | None, *, dtype: str = "auto", instance_type: str | None = None,
                    wait: bool = False, dry_run: bool = False, echo=print) -> dict[str, Any]:

    if dest and not dest.startswith("s3://") and not wait and not dry_run:
        raise ConfigError([("DEST", "a local directory needs --wait (the merged files are downloaded at the end); "
                                    "or give an s3:// prefix")])
    desc = _completed(job)
    model_id = _decoded(desc.get("HyperParameters", {})).get("model", {}).get("id", "")

    shape = resolve(model_id)
    why = "asked for"
    if instance_type is None:
        instance_type, why = choose_instance(shape, model_id, desc.get("ResourceConfig", {}).get("InstanceType"))
    elif instance_type not in catalog().instances:
        raise ConfigError([("--instance-type", f"{instance_type!r} is not a SageMaker GPU training instance")])
    name = merge_job_name(job.name)
    output = dest.rstrip("/") if dest and dest.startswith("s3://") else default_output(desc)
    request = merge_request(desc, job.backend.adapter_uri(desc), name=name, output=output,
                            instance_type=instance_type, dtype=dtype,
                            params=shape.total_params if shape else None)
    result = {"job_name": job.name, "local": False, "merge_job": name, "instance_type": instance_type,
              "instance_reason": why, "merged": f"{output}/{name}/output/model/", "base_model": model_id}
    if dry_run:
        return result | {"dry_run": True, "request": request}
    with translated(f"create the merge job {name}"):
        client("sagemaker", job.region, job.backend.profile).create_training_job(**request)
    echo(f"merge job {name} on {instance_type} ({why})")
    if wait:
        # a handle of the adapter job's own kind: merge.py sits below job.py and never imports it
        merge = type(job)(name=name, backend=SageMakerBackend(name, job.region, job.backend.profile, output))
        merge.wait()
        if dest and not dest.startswith("s3://"):
            result["files"] = [str(p) for p in merge.download(dest)]
            result["downloaded_to"] = dest
    return result


def merge_job(job, dest: str | Path | None, *, dtype: str = "auto", instance_type: str | None = None,
              wait: bool = False, dry_run: bool = False, echo=print) -> dict[str, Any]:
    """`Job.merge()`: a local run merges here into `dest`; a SageMaker job gets a merge job."""
    if dtype not in DTYPES:
        raise _config_error("--dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    if job.is_local:
        if dest is None:
            raise _config_error("DEST", "a local run merges into a directory: name it")
        return merge_local(job, dest, dtype=dtype, echo=echo, dry_run=dry_run)
    return merge_sagemaker(job, None if dest is None else str(dest), dtype=dtype, instance_type=instance_type,
                           wait=wait, dry_run=dry_run, echo=echo)
