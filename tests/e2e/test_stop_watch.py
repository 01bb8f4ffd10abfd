"""entrypoint/stopping.py against moto's server: a job without the wrapper asks
DescribeTrainingJob for its own status, stops on Stopping, and turns the watch off in one
line, never failing the job, when it cannot ask. moto has no StopTrainingJob and its jobs
are Completed at once, so the Stopping status is set on moto's job by hand."""

from __future__ import annotations

import threading

import pytest

from entrypoint import stopping
from launcher.job import launch_job
from tests.e2e.test_toolkit import set_moto_status


@pytest.fixture
def job(aws, job_dict, monkeypatch):
    name = launch_job(job_dict).name
    monkeypatch.setenv("TRAINING_JOB_NAME", name)
    monkeypatch.setenv("TRAINING_JOB_ARN", f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{name}")
    monkeypatch.setenv("SM_QLORA_STOP_POLL_S", "0.05")
    monkeypatch.setattr(stopping, "wrapped", lambda: False)
    return name


def test_stopping_is_seen_within_a_poll_and_only_then(job):
    said, stopped = [], threading.Event()
    done = stopping.watch(stopped.set, lambda kind, **kv: said.append((kind, kv)))
    assert done is not None and said == [("info", {"stop_watch": "DescribeTrainingJob", "every_s": "0.05"})]
    assert not stopped.wait(0.5)  # Completed (moto's InProgress) is no stop
    set_moto_status(job, "Stopping")
    try:
        assert stopped.wait(5)
    finally:
        set_moto_status(job, "Completed")
        done.set()


def test_a_job_it_cannot_ask_about_turns_the_watch_off_in_one_line(job, monkeypatch):
    monkeypatch.setenv("TRAINING_JOB_NAME", "not-this-job")
    said, stopped, finished = [], threading.Event(), threading.Event()

    def say(kind, **kv):
        said.append((kind, kv))
        if "stop_watch" in kv and kv["stop_watch"] == "off":
            finished.set()

    stopping.watch(stopped.set, say)
    assert finished.wait(10)
    assert said[-1] == ("info", {"stop_watch": "off", "reason": "ValidationException",
                                 "a_stop_loses_at_most": "training.checkpoint_minutes"})
    assert not stopped.is_set()


def test_nothing_is_watched_outside_sagemaker_or_under_the_wrapper(job, monkeypatch):
    monkeypatch.setattr(stopping, "wrapped", lambda: True)
    assert stopping.watch(lambda: None, lambda *a, **k: None) is None
    monkeypatch.setattr(stopping, "wrapped", lambda: False)
    monkeypatch.delenv("TRAINING_JOB_NAME")
    assert stopping.watch(lambda: None, lambda *a, **k: None) is None
