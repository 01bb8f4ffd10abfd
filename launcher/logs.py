"""Following a job's log: every CloudWatch stream of the job (one per instance, streams
that appear later included), each line printed once, a live progress bar built from the
SPEC's progress lines, and the outcome at the end.

Exactly-once comes from CloudWatch's own forward tokens: a stream's token advances only
after its events are buffered, and a failed call (throttling, a dropped connection) is
retried with the same token after a backoff, so a line is neither skipped nor repeated.
Written by hand: the SageMaker SDK's `logs_for_job` prints but cannot feed a progress
bar, survive Ctrl-C with re-attach hints, or emit JSON lines for CI.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoint.progress import Progress
from launcher.errors import AWSError, Interrupted

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL = ("Completed", "Failed", "Stopped")


@dataclass
class Line:
    stream: str
    timestamp: int
    message: str


class CloudWatchSource:
    def __init__(self, job_name: str, client):
        self.prefix = f"{job_name}/"
        self.client = client
        self.tokens: dict[str, str | None] = {}
        self.pending: list[Line] = []

    def _streams(self) -> list[str]:
        names, kwargs = [], {"logGroupName": LOG_GROUP, "logStreamNamePrefix": self.prefix}
        try:
            while True:
                page = self.client.describe_log_streams(**kwargs)
                names += [s["logStreamName"] for s in page.get("logStreams", [])]
                if not page.get("nextToken"):
                    return names
                kwargs["nextToken"] = page["nextToken"]
        except self.client.exceptions.ResourceNotFoundException:
            return []  # the log group appears with the first job of the account

    def poll(self) -> list[Line]:
        """New lines of every stream since the last poll, oldest first. Raises on AWS
        errors; what was fetched before the error is kept for the next call."""
        for name in self._streams():
            self.tokens.setdefault(name, None)
        for name in sorted(self.tokens):
            while True:
                kwargs = {"logGroupName": LOG_GROUP, "logStreamName": name, "startFromHead": True}
                if self.tokens[name]:
                    kwargs["nextToken"] = self.tokens[name]
                page = self.client.get_log_events(**kwargs)
                self.pending += [Line(name, e["timestamp"], e["message"]) for e in page["events"]]
                same = page["nextForwardToken"] == self.tokens[name]
                self.tokens[name] = page["nextForwardToken"]
                if same or not page["events"]:
                    break
        out, self.pending = sorted(self.pending, key=lambda x: (x.timestamp, x.stream)), []
        return out

    def tail(self, limit: int = 200) -> list[Line]:
        """The last lines of each stream (for status), without moving the follow tokens."""
        lines = []
        for name in self._streams():
            page = self.client.get_log_events(logGroupName=LOG_GROUP, logStreamName=name,
                                              startFromHead=False, limit=limit)
            lines += [Line(name, e["timestamp"], e["message"]) for e in page["events"]]
        return sorted(lines, key=lambda x: (x.timestamp, x.stream))


class FileSource:
    """A local run's runs/<job>/output/job.log, read as one stream."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def poll(self) -> list[Line]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        now = int(time.time() * 1000)
        return [Line("local", now, x) for x in chunk[:end].decode(errors="replace").splitlines()]

    def tail(self, limit: int = 200) -> list[Line]:
        if not self.path.is_file():
            return []
        return [Line("local", 0, x) for x in self.path.read_text(errors="replace").splitlines()[-limit:]]


def with_backoff(call: Callable[[], Any], *, what: str, give_up_after_s: float = 300.0,
                 sleep: Callable[[float], None] = time.sleep, warn: Callable[[str], None] | None = None):
    """Retry a poll through throttling and dropped connections (beyond botocore's own
    retries), doubling the wait up to 30 s; AWSError once `give_up_after_s` has passed."""
    from botocore.exceptions import BotoCoreError, ClientError

    delay, started = 1.0, time.monotonic()
    while True:
        try:
            return call()
        except (ClientError, BotoCoreError, AWSError) as exc:
            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
                    "AccessDeniedException", "AccessDenied", "UnrecognizedClientException"):
                raise AWSError(f"{what}: {exc}", "check the credentials' logs:* permissions") from None
            if time.monotonic() - started > give_up_after_s:
                raise AWSError(f"{what}: still failing after {give_up_after_s:.0f}s: {exc}") from None
            if warn:
                code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
                warn(f"{what}: {code or type(exc).__name__}; retrying in {delay:.0f}s")
            sleep(delay)
            delay = min(delay * 2, 30.0)


# --------------------------------------------------------------------------- the outcome and its costs

def price_of(desc: dict) -> float | None:
    """On-demand price of one instance of the described job, from the catalog."""
    from launcher.instances import catalog

    inst = catalog().instances.get(desc.get("ResourceConfig", {}).get("InstanceType"))
    return inst.price_per_hour if inst else None


def cost_so_far(desc: dict, price_per_hour: float | None, now: float | None = None) -> dict[str, Any]:
    """On-demand dollars so far: billable seconds once the job ended, else the time since
    training started (an upper bound for spot jobs)."""
    count = desc.get("ResourceConfig", {}).get("InstanceCount", 1)
    billable = desc.get("BillableTimeInSeconds")
    start = timestamp_s(desc.get("TrainingStartTime"))
    end = timestamp_s(desc.get("TrainingEndTime")) or (now or time.time())
    seconds = float(billable) if billable is not None else (max(0.0, end - start) if start else 0.0)
    out = {"seconds": round(seconds), "instance_count": count, "price_per_hour": price_per_hour,
           "usd": round(seconds / 3600 * count * price_per_hour, 2) if price_per_hour else None,
           "spot": bool(desc.get("EnableManagedSpotTraining"))}
    training = desc.get("TrainingTimeInSeconds")
    if billable is not None and training:
        out["spot_saving_pct"] = round(100 * (1 - billable / training), 1)
    return out


def timestamp_s(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return value.timestamp()


# --------------------------------------------------------------------------- rendering

class View:
    """Prints lines; on a terminal also keeps a live progress bar under them."""

    def __init__(self, job_name: str, as_json: bool, live: bool):
        self.job_name = job_name
        self.as_json = as_json
        self.live = None
        self.last_state: tuple | None = None
        if live and not as_json:
            from rich.console import Console
            from rich.live import Live

            self.console = Console(force_terminal=True)
            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.start()

    def state(self, desc: dict) -> None:
        """Say when the job's state changes (Starting, Downloading, Training, Uploading...):
        on the bar when there is one, else on stderr, or as a JSON line."""
        state = (desc.get("TrainingJobStatus"), desc.get("SecondaryStatus"))
        if state == self.last_state or state == (None, None):
            return
        self.last_state = state
        if self.as_json:
            print(json.dumps({"status": state[0], "secondary_status": state[1]}), flush=True)
        elif not self.live:
            print(f"[sm-qlora] {self.job_name}: {state[0]} ({state[1]})", file=sys.stderr, flush=True)

    def line(self, line: Line, progress: Progress) -> None:
        if self.as_json:
            ev = progress.update(line.message)
            obj = {"stream": line.stream, "timestamp": line.timestamp, "message": line.message}
            if ev is not None:
                obj["event"] = {"kind": ev.kind, **ev.values}
            print(json.dumps(obj), flush=True)
            return
        progress.update(line.message)
        if self.live:
            self.console.print(line.message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line.message, flush=True)

    def status(self, progress: Progress, desc: dict, cost: dict) -> None:
        if not self.live:
            return
        from rich.text import Text

        state = desc.get("SecondaryStatus") or desc.get("TrainingJobStatus", "?")
        usd = f"${cost['usd']:.2f}" if cost.get("usd") is not None else "n/a"
        if progress.last_train is None:
            self.live.update(Text(f"{self.job_name}: {state}  cost so far {usd}"), refresh=True)
            return
        total = progress.total or 0
        done = progress.step / total if total else 0.0
        width = 30
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        v = progress.last_train.values
        self.live.update(Text(
            f"[{bar}] {progress.step}/{total} loss {v.get('loss', '?')} {v.get('tokens_per_sec', '?')} tok/s "
            f"eta {v.get('eta', '?')}  {state}  cost so far {usd}"), refresh=True)

    def close(self) -> None:
        if self.live:
            self.live.stop()


def follow(job, *, as_json: bool = False, follow: bool = True, poll_s: float = 5.0, describe_every_s: float = 20.0,
           live: bool | None = None, sleep: Callable[[float], None] = time.sleep) -> int:
    """Print the job's log (and follow it to the end with `follow`); return the SPEC exit
    code: 0 Completed (or still running when not following), 1 Failed/Stopped, 130 Ctrl-C."""
    source = job.log_source()
    progress = Progress()
    view = View(job.name, as_json, sys.stdout.isatty() if live is None else live)

    def warn(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    desc: dict = {}
    last_describe = -1e9
    try:
        while True:
            if time.monotonic() - last_describe >= describe_every_s or not follow:
                desc = with_backoff(job.describe, what="describe the job", sleep=sleep, warn=warn)
                last_describe = time.monotonic()
            ended = desc.get("TrainingJobStatus") in TERMINAL
            view.state(desc)
            for line in with_backoff(source.poll, what="read CloudWatch logs", sleep=sleep, warn=warn):
                view.line(line, progress)
            view.status(progress, desc, cost_so_far(desc, price_of(desc)))
            if ended or not follow:
                break
            sleep(poll_s)
    except KeyboardInterrupt:
        view.close()
        raise Interrupted(
            f"detached from {job.name}; the job goes on",
            f"re-attach: sm-qlora logs {job.name} --follow\n  -> stop:      sm-qlora stop {job.name}") from None
    view.close()
    return outcome(job, desc, progress, as_json, final=follow or desc.get("TrainingJobStatus") in TERMINAL)


def outcome(job, desc: dict, progress: Progress, as_json: bool, final: bool) -> int:
    status = desc.get("TrainingJobStatus", "Unknown")
    cost = cost_so_far(desc, price_of(desc))
    adapter = job.adapter_uri_from(desc) if status == "Completed" else None
    summary = {"job_name": job.name, "status": status, "secondary_status": desc.get("SecondaryStatus"),
               "failure_reason": desc.get("FailureReason"), "step": progress.step, "total_steps": progress.total,
               "cost": cost, "adapter": adapter}
    if as_json:
        print(json.dumps({"summary": summary}, default=str), flush=True)
    elif final:
        lines = [f"{job.name}: {status}"]
        if desc.get("FailureReason"):
            lines.append(f"  reason: {desc['FailureReason']}")
        if cost["seconds"]:
            usd = f" (~${cost['usd']:.2f} on demand)" if cost["usd"] is not None else ""
            lines.append(f"  billable: {cost['seconds']} s x {cost['instance_count']}{usd}")
        if "spot_saving_pct" in cost and cost["spot"]:
            lines.append(f"  spot saving: {cost['spot_saving_pct']}%")
        if status == "Completed":
            lines.append(f"  adapter: {adapter}")
            lines.append(f"  fetch it: sm-qlora download {job.name} ./adapter")
        print("\n".join(lines), flush=True)
    return 1 if status in ("Failed", "Stopped") else 0


def describe_progress(job, limit: int = 200) -> Progress:
    progress = Progress()
    for line in job.log_source().tail(limit):
        progress.update(line.message)
    return progress


__all__ = ["follow", "cost_so_far", "describe_progress"]
