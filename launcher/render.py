"""How the CLI shows a job's log: the lines, a live rich progress bar on a terminal, JSON
lines for CI, the end summary, and the SPEC exit code. Used only by launcher/control.py;
the library yields data (`Job.lines()`), this module prints it."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from entrypoint.progress import Progress
from launcher.errors import Interrupted
from launcher.logs import TERMINAL, LogLine, StateChange, cost_so_far, money


class View:
    """Prints lines; on a terminal also keeps a live progress bar under them."""

    def __init__(self, job_name: str, as_json: bool, live: bool):
        self.job_name = job_name
        self.as_json = as_json
        self.live = None
        if live and not as_json:
            from rich.console import Console
            from rich.live import Live

            self.console = Console(force_terminal=True)
            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.start()

    def state(self, change: StateChange) -> None:
        """Say when the job's state changes (Starting, Downloading, Training, Uploading...):
        on the bar when there is one, else on stderr, or as a JSON line."""
        if (change.status, change.secondary_status) == (None, None):
            return
        if self.as_json:
            print(json.dumps({"status": change.status, "secondary_status": change.secondary_status}), flush=True)
        elif not self.live:
            print(f"[sm-qlora] {self.job_name}: {state_text(change.status, change.secondary_status)}",
                  file=sys.stderr, flush=True)

    def line(self, line: LogLine) -> None:
        if self.as_json:
            obj = {"stream": line.stream, "timestamp": line.timestamp, "message": line.message}
            if line.event is not None:
                obj["event"] = {"kind": line.event.kind, **line.event.typed()}
            print(json.dumps(obj), flush=True)
        elif self.live:
            self.console.print(line.message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line.message, flush=True)

    def bar(self, progress: Progress, desc: dict) -> None:
        if not self.live:
            return
        from rich.text import Text

        state = desc.get("SecondaryStatus") or desc.get("TrainingJobStatus", "?")
        usd = money(cost_so_far(desc)) or "n/a"
        if progress.last_train is None:
            self.live.update(Text(f"{self.job_name}: {state}  cost so far {usd}"), refresh=True)
            return
        total = progress.total or 0
        width = 30
        filled = int((progress.step / total if total else 0.0) * width)
        v = progress.last_train.values
        self.live.update(Text(
            f"[{'#' * filled}{'-' * (width - filled)}] {progress.step}/{total} loss {v.get('loss', '?')} "
            f"{v.get('tokens_per_sec', '?')} tok/s eta {v.get('eta', '?')}  {state}  cost so far {usd}"), refresh=True)

    def close(self) -> None:
        if self.live:
            self.live.stop()


def state_text(status: str | None, secondary: str | None) -> str:
    """"InProgress (Training)", and just "Completed" when both say the same."""
    return f"{status} ({secondary})" if secondary and secondary != status else str(status)


def follow_job(job, out, follow: bool = True, *, live: bool | None = None, poll_s: float = 5.0,
               describe_every_s: float = 20.0, sleep: Callable[[float], None] = time.sleep) -> int:
    """Print the job's log (and follow it to the end with `follow`); return the SPEC exit
    code: 0 Completed (or still running when not following), 1 Failed/Stopped; Ctrl-C
    raises Interrupted (130) with the commands to re-attach and to stop."""
    progress = Progress()
    view = View(job.name, out.json, sys.stdout.isatty() if live is None else live)

    def warn(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    desc: dict = {}
    try:
        for item in job.lines(follow=follow, poll_s=poll_s, describe_every_s=describe_every_s, sleep=sleep,
                              warn=warn):
            if isinstance(item, StateChange):
                desc = item.desc
                view.state(item)
            else:
                progress.update(item.message)
                view.line(item)
            view.bar(progress, desc)
    except KeyboardInterrupt:
        raise Interrupted(
            f"detached from {job.name}; the job goes on",
            f"re-attach: sm-qlora logs {job.name} --follow\n  -> stop:      sm-qlora stop {job.name}") from None
    finally:
        view.close()
    return outcome(job, desc, progress, out.json, final=follow or desc.get("TrainingJobStatus") in TERMINAL)


def outcome(job, desc: dict, progress: Progress, as_json: bool, final: bool) -> int:
    status = desc.get("TrainingJobStatus", "Unknown")
    cost = cost_so_far(desc)
    adapter = job.adapter_uri if status == "Completed" else None
    if as_json:
        print(json.dumps({"summary": {
            "job_name": job.name, "status": status, "secondary_status": desc.get("SecondaryStatus"),
            "failure_reason": desc.get("FailureReason"), "step": progress.step, "total_steps": progress.total,
            "cost": cost, "adapter": adapter}}, default=str), flush=True)
    elif final:
        lines = [f"{job.name}: {status}"]
        if desc.get("FailureReason"):
            lines.append(f"  reason: {desc['FailureReason']}")
        if cost["seconds"]:
            usd = f" (~{money(cost)} on demand)" if money(cost) else ""
            lines.append(f"  billable: {cost['seconds']} s x {cost['instance_count']}{usd}")
        if "spot_saving_pct" in cost and cost["spot"]:
            lines.append(f"  spot saving: {cost['spot_saving_pct']}%")
        if status == "Completed":
            lines.append(f"  adapter: {adapter}")
            lines.append(f"  fetch it: sm-qlora download {job.name} ./adapter")
        print("\n".join(lines), flush=True)
    return exit_code(status)


def exit_code(status: str | None) -> int:
    """SPEC: 1 when the job Failed or was Stopped."""
    return 1 if status in ("Failed", "Stopped") else 0
