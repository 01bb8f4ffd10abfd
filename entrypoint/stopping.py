"""How a job learns of its own stop when no SIGTERM will reach it.

A tuning job's training definition has no ContainerEntrypoint, so its training jobs start
with the image's own PID 1 (bash), which drops the SIGTERM of StopTrainingJob; SIGKILL
follows 120 s later. When the sm-qlora wrapper is not PID 1 and the job runs on SageMaker,
rank 0 asks DescribeTrainingJob for its own status every `SM_QLORA_STOP_POLL_S` seconds
(default 30) and takes `Stopping` as the stop signal. It fails soft: when it cannot ask
(the role lacks sagemaker:DescribeTrainingJob, no route to the API) it says so in one line
and stops asking; the clock checkpoint (`training.checkpoint_minutes`) still bounds the loss.
Standard library and boto3 (in every training image); no torch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from entrypoint import container

DEFAULT_POLL_S = 30.0
GIVE_UP_AFTER = 3  # failed asks in a row: a transient error is tried again, a lasting one is not
LASTING = {"AccessDeniedException", "AccessDenied", "ValidationException", "UnrecognizedClientException"}


def wrapped() -> bool:
    """Whether PID 1 is the sm-qlora wrapper (`bash -c MAIN sm-qlora FUNCTION`), which passes
    SIGTERM on by itself."""
    try:
        argv = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(argv) > 3 and argv[0].endswith(b"bash") and argv[1] == b"-c" and argv[3] == b"sm-qlora"


def watch(on_stop: Callable[[], None], say: Callable[..., object]) -> threading.Event | None:
    """Start asking, in a daemon thread, when it is needed; returns an Event that ends the
    watch when set, or None when there is nothing to watch (not on SageMaker, or wrapped)."""
    name = os.environ.get(container.TRAINING_JOB_NAME)
    arn = os.environ.get(container.TRAINING_JOB_ARN, "")
    if not name or wrapped():
        return None
    region = arn.split(":")[3] if arn.count(":") >= 5 else os.environ.get("AWS_REGION")
    poll_s = float(os.environ.get(container.STOP_POLL_S) or DEFAULT_POLL_S)
    done = threading.Event()
    threading.Thread(target=_poll, args=(name, region, poll_s, on_stop, say, done), daemon=True,
                     name="stop-watch").start()
    say("info", stop_watch="DescribeTrainingJob", every_s=f"{poll_s:g}")
    return done


def _poll(name: str, region: str | None, poll_s: float, on_stop: Callable[[], None], say: Callable[..., object],
          done: threading.Event) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client("sagemaker", region_name=region,
                          config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
    failures = 0
    while not done.wait(poll_s):
        try:
            status = client.describe_training_job(TrainingJobName=name)["TrainingJobStatus"]
        except Exception as exc:  # any failure to ask: never the job's failure
            failures += 1
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in LASTING or failures >= GIVE_UP_AFTER:
                say("info", stop_watch="off", reason=code or type(exc).__name__,
                    a_stop_loses_at_most="training.checkpoint_minutes")
                return
            continue
        failures = 0
        if status == "Stopping":
            on_stop()
            return
