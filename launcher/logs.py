"""A job's log as data: every CloudWatch stream of the job (one per instance, streams
that appear later included) or a local run's job.log, each line yielded once with its
parsed progress event, plus the job's state changes. The cost of a job is here too,
as one function of its description and a price. Rendering lives in launcher/render.py.

Exactly-once comes from CloudWatch's own forward tokens: a stream's token advances only
after its events are buffered, and a failed call (throttling, a dropped connection) is
retried with the same token after a backoff, so a line is neither skipped nor repeated.
A stream is read until its forward token repeats, not until the first empty page:
GetLogEvents may return an empty page with a new token while more events remain.
Written by hand: the SageMaker SDK's `logs_for_job` prints but yields nothing.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoint.progress import Event, Progress, parse
from launcher.aws import TransientAWSError, is_transient, translated
from launcher.errors import AWSError
from launcher.instances import catalog, format_usd

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL = ("Completed", "Failed", "Stopped")


@dataclass(frozen=True)
class LogLine:
    """One line of the job's output; `event` is its parsed progress line, if it is one."""

    stream: str
    timestamp: int
    message: str
    event: Event | None = None


@dataclass(frozen=True)
class StateChange:
    """The job's status or secondary status changed; `desc` is the whole description."""

    status: str | None
    secondary_status: str | None
    desc: dict[str, Any]


def _line(stream: str, timestamp: int, message: str) -> LogLine:
    return LogLine(stream, timestamp, message, parse(message))


class CloudWatchSource:
    def __init__(self, job_name: str, client):
        self.prefix = f"{job_name}/"
        self.client = client
        self.tokens: dict[str, str | None] = {}
        self.pending: list[LogLine] = []

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

    def poll(self) -> list[LogLine]:
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
                self.pending += [_line(name, e["timestamp"], e["message"]) for e in page["events"]]
                same = page["nextForwardToken"] == self.tokens[name]
                self.tokens[name] = page["nextForwardToken"]
                if same:  # the end of the stream for now; an empty page alone is not
                    break
        out, self.pending = sorted(self.pending, key=lambda x: (x.timestamp, x.stream)), []
        return out

    def tail(self, limit: int = 200) -> list[LogLine]:
        """The last lines of each stream (for status), without moving the follow tokens."""
        lines = []
        for name in self._streams():
            page = self.client.get_log_events(logGroupName=LOG_GROUP, logStreamName=name,
                                              startFromHead=False, limit=limit)
            lines += [_line(name, e["timestamp"], e["message"]) for e in page["events"]]
        return sorted(lines, key=lambda x: (x.timestamp, x.stream))


def read_complete_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """The complete lines of a growing file from byte `offset`, and the offset after them
    (a partial last line waits for its newline)."""
    if not path.is_file():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1
    return chunk[:end].decode(errors="replace").splitlines(), offset + end


def times_path(log: Path) -> Path:
    """Beside job.log, the local owner's record of when the log grew: lines of
    `<size in bytes> <epoch ms>`, one per poll that saw new bytes."""
    return log.with_name(log.name + ".times")


def record_growth(log: Path, last_size: int) -> int:
    """Note the log's size now, if it grew; return the size. A line whose last byte is
    below a noted size was written by that time (the owner polls every 0.2 s)."""
    try:
        size = log.stat().st_size
        if size > last_size:
            with times_path(log).open("a") as f:
                f.write(f"{size} {int(time.time() * 1000)}\n")
    except OSError:  # a full disk: the log's times are a nicety, the run goes on
        return last_size
    return size


class FileSource:
    """A local run's runs/<job>/output/job.log, read as one stream. Each line carries the
    time it was written (from the owner's job.log.times), not the time it was read."""

    def __init__(self, path: Path, offset: int = 0):
        self.path = path
        self.offset = offset

    def _written_at(self) -> Callable[[int], int]:
        sizes, stamps = [], []
        try:
            for row in times_path(self.path).read_text().splitlines():
                size, _, ms = row.partition(" ")
                if size.isdigit() and ms.isdigit():
                    sizes.append(int(size))
                    stamps.append(int(ms))
        except OSError:
            pass
        now = int(time.time() * 1000)

        def at(end: int) -> int:
            i = bisect.bisect_left(sizes, end)
            return stamps[i] if i < len(stamps) else now  # not noted yet (or a run without times)

        return at

    def poll(self) -> list[LogLine]:
        start = self.offset
        lines, self.offset = read_complete_lines(self.path, self.offset)
        if not lines:
            return []
        at, end, out = self._written_at(), start, []
        with self.path.open("rb") as f:  # each line's end in bytes, as the times are noted
            f.seek(start)
            raw = f.read(self.offset - start).split(b"\n")[:-1]
        for chunk in raw:
            end += len(chunk) + 1
            out.append(at(end))
        if len(out) != len(lines):  # a line held a \r or another break splitlines knows
            out = [out[-1]] * len(lines)
        return [_line("local", ms, x) for ms, x in zip(out, lines, strict=True)]

    def tail(self, limit: int = 200) -> list[LogLine]:
        if not self.path.is_file():
            return []
        return [_line("local", 0, x) for x in self.path.read_text(errors="replace").splitlines()[-limit:]]


def with_backoff(call: Callable[[], Any], *, what: str, give_up_after_s: float = 300.0,
                 sleep: Callable[[float], None] = time.sleep, warn: Callable[[str], None] | None = None):
    """Retry a poll through throttling and dropped connections (beyond botocore's own
    retries), doubling the wait up to 30 s; AWSError once `give_up_after_s` has passed.
    Anything else (a missing job, no region, no permission) is raised at once."""
    from botocore.exceptions import ClientError

    delay, started = 1.0, time.monotonic()
    while True:
        try:
            return call()
        except Exception as exc:
            if not (isinstance(exc, TransientAWSError) or is_transient(exc)):
                with translated(what):  # botocore errors become AWSError with a hint
                    raise
            if time.monotonic() - started > give_up_after_s:
                raise AWSError(f"{what}: still failing after {give_up_after_s:.0f}s: {exc}") from None
            if warn:
                code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
                warn(f"{what}: {code or type(exc).__name__}; retrying in {delay:.0f}s")
            sleep(delay)
            delay = min(delay * 2, 30.0)


def follow_lines(job, *, follow: bool, poll_s: float = 5.0, describe_every_s: float = 20.0,
                 sleep: Callable[[float], None] = time.sleep,
                 warn: Callable[[str], None] | None = None) -> Iterator[LogLine | StateChange]:
    """The job's lines (and state changes) so far; with `follow`, until the job ends.
    The last StateChange yielded carries the description the job ended with."""
    source = job.log_source()
    last_state: tuple | None = None
    desc: dict = {}
    last_describe = -1e9
    while True:
        if time.monotonic() - last_describe >= describe_every_s or not follow:
            desc = with_backoff(job.describe, what=f"describe {job.name}", sleep=sleep, warn=warn)
            last_describe = time.monotonic()
        state = (desc.get("TrainingJobStatus"), desc.get("SecondaryStatus"))
        if state != last_state:
            last_state = state
            yield StateChange(state[0], state[1], desc)
        yield from with_backoff(source.poll, what="read the job's log", sleep=sleep, warn=warn)
        if state[0] in TERMINAL or not follow:
            return
        sleep(poll_s)


def progress_of(job, limit: int | None = 200) -> Progress:
    """What the last `limit` lines of each stream say (step, loss curves, outcome); with
    no limit, every line from the first (a plot shows the whole job)."""
    progress = Progress()
    with translated(f"read the log of {job.name}"):  # refused or unreachable: exit 3, one line
        source = job.log_source()
        for line in source.poll() if limit is None else source.tail(limit):
            progress.update(line.message)
    return progress


# --------------------------------------------------------------------------- cost, said once

def price_of(desc: dict) -> float | None:
    """On-demand price of one instance of the described job, from the catalog."""
    inst = catalog().instances.get(desc.get("ResourceConfig", {}).get("InstanceType"))
    return inst.price_per_hour if inst else None


def cost_so_far(desc: dict, price_per_hour: float | None = None, now: float | None = None) -> dict[str, Any]:
    """On-demand dollars so far: billable seconds once the job ended, else the time since
    training started (an upper bound for spot jobs). The price defaults to the catalog's."""
    if price_per_hour is None:
        price_per_hour = price_of(desc)
    count = desc.get("ResourceConfig", {}).get("InstanceCount", 1)
    billable = desc.get("BillableTimeInSeconds")
    start = timestamp_s(desc.get("TrainingStartTime"))
    end = timestamp_s(desc.get("TrainingEndTime")) or (now or time.time())
    seconds = float(billable) if billable is not None else (max(0.0, end - start) if start else 0.0)
    out = {"seconds": round(seconds), "instance_count": count, "price_per_hour": price_per_hour,
           "usd": round(seconds / 3600 * count * price_per_hour, 2) if price_per_hour else None,
           "spot": bool(desc.get("EnableManagedSpotTraining"))}
    max_runtime = desc.get("StoppingCondition", {}).get("MaxRuntimeInSeconds")
    if max_runtime and price_per_hour:  # the most it can cost: SageMaker stops it at MaxRuntime
        out["max_usd"] = round(max_runtime / 3600 * count * price_per_hour, 2)
    training = desc.get("TrainingTimeInSeconds")
    if billable is not None and training:
        out["spot_saving_pct"] = round(100 * (1 - billable / training), 1)
    return out


def money(cost: dict) -> str | None:
    """The one way a cost is written for a person: $12.34, or None when unpriced."""
    return format_usd(cost["usd"]) if cost.get("usd") is not None else None


def timestamp_s(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return value.timestamp()


__all__ = ["LogLine", "StateChange", "follow_lines", "cost_so_far", "money", "progress_of"]
