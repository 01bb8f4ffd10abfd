"""The CLI verbs that act on an existing job: status, list, logs, stop, plot, download.
Each verb's arguments sit beside its handler; a handler calls the library (`Job`,
`list_jobs`) and only formats what it returns. `register()` adds them to the CLI."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from launcher.instances import format_usd
from launcher.job import Job, list_jobs
from launcher.logs import money
from launcher.merge import DTYPES
from launcher.render import exit_code, follow_job, state_text
from launcher.verb import add_verb

Handler = Callable[[argparse.Namespace, object], int]


def _job(args) -> Job:
    return Job.attach(args.job, region=args.region, profile=args.profile)


def cmd_status(args, out) -> int:
    """sm-qlora status medical-mixtral-20261129-101500 --output json"""
    job = _job(args)
    s = job.summary()
    if args.plot:
        s["plot"] = str(job.plot(args.plot))
    step = f"{s['step']}/{s['total_steps']}" if s["total_steps"] else str(s["step"] or "-")
    text = [
        f"{s['job_name']}: {state_text(s['status'], s['secondary_status'])}" + (" [local]" if s["local"] else ""),
        f"  progress: step {step}  loss {s['loss'] or '-'}  eval_loss {s['eval_loss'] or '-'}  eta {s['eta'] or '-'}",
        f"  elapsed:  {s['elapsed_s'] if s['elapsed_s'] is not None else '-'} s   cost so far: {money(s['cost']) or '-'}"
        + (f" of at most {format_usd(s['cost']['max_usd'])} (MaxRuntime)" if s["cost"].get("max_usd") else "")
        + (f" ({s['instance_type']} x{s['cost']['instance_count']})" if s["instance_type"] else ""),
    ]
    if s["failure_reason"]:
        text.append(f"  reason:   {s['failure_reason']}")
    if s["adapter"]:
        text.append(f"  adapter:  {s['adapter']}")
    if args.plot:
        text.append(f"  plot:     {s['plot']}")
    out.result(s, "\n".join(text))
    return exit_code(s["status"])


def cmd_list(args, out) -> int:
    """sm-qlora list --max 20"""
    listed = list_jobs(args.region, args.profile, args.max)
    for skipped in listed.skipped:
        out.info(f"warning: skipped a damaged local run: {skipped}")
    if listed.sagemaker_unavailable:
        out.info(f"(SageMaker jobs not listed: {listed.sagemaker_unavailable})")
    if out.json:
        out.result({"jobs": listed.jobs})
        return 0
    from datetime import datetime, timezone

    from rich.console import Console
    from rich.table import Table

    table = Table("job", "status", "where", "created (UTC)")
    for r in listed.jobs:
        created = datetime.fromtimestamp(r["created"], timezone.utc).strftime("%Y-%m-%d %H:%M") if r["created"] else "-"
        table.add_row(r["job_name"], r["status"] or "?", r["where"], created)
    Console().print(table)
    return 0


def cmd_logs(args, out) -> int:
    """sm-qlora logs medical-mixtral-20261129-101500 --follow"""
    return follow_job(_job(args), out, follow=args.follow)


def cmd_stop(args, out) -> int:
    """sm-qlora stop medical-mixtral-20261129-101500"""
    job = _job(args)
    stopped = job.stop()
    status = job.status()
    if stopped:
        msg = f"stopping {job.name} ({status}); it checkpoints first, and its checkpoints stay"
    else:
        msg = f"{job.name} has already ended ({status}); nothing to stop"
    out.result({"job_name": job.name, "stop_requested": stopped, "status": status}, msg)
    return 0


def cmd_plot(args, out) -> int:
    """sm-qlora plot medical-mixtral-20261129-101500 --out loss.png"""
    job = _job(args)
    path = job.plot(args.out)
    out.result({"job_name": job.name, "plot": str(path)}, f"wrote {path}")
    return 0


def cmd_download(args, out) -> int:
    """sm-qlora download medical-mixtral-20261129-101500 ./adapter"""
    job = _job(args)
    files = job.download(args.dest)
    out.result({"job_name": job.name, "dest": args.dest, "files": [str(f) for f in files]},
               f"downloaded {len(files)} files from {job.adapter_uri} to {args.dest}")
    return 0


def cmd_merge(args, out) -> int:
    """sm-qlora merge tiny-medical-20261129-101500 ./merged
  sm-qlora merge medical-mixtral-20261129-101500 s3://my-bucket/qlora/merged --dry-run"""
    result = _job(args).merge(args.dest, dtype=args.dtype, instance_type=args.instance_type, wait=args.wait,
                              dry_run=args.dry_run, echo=out.info)
    if result.get("dry_run") and result["local"]:
        out.result(result, f"would merge {args.job} into {result['merged']} (nothing written): "
                   + " ".join(result["command"]))
    elif result.get("dry_run"):
        out.result(result, json.dumps(result["request"], indent=2))
    elif result["local"]:
        out.result(result, f"merged {args.job} into {result['merged']} ({len(result['files'])} files)")
    else:
        lines = [f"merge job {result['merge_job']} ({result['instance_type']})",
                 f"  merged model: {result['merged']}",
                 f"  follow:       sm-qlora logs {result['merge_job']} --follow"]
        if result.get("downloaded_to"):
            lines.append(f"  downloaded:   {len(result['files'])} files to {result['downloaded_to']}")
        out.result(result, "\n".join(lines))
    return 0


def _positive(text: str) -> int:
    """--max: SageMaker's ListTrainingJobs takes 1 to 100."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= n <= 100:
        raise argparse.ArgumentTypeError(f"{n} is not between 1 and 100")
    return n


def register(sub, common: argparse.ArgumentParser, aws: argparse.ArgumentParser) -> None:
    """Add the job verbs to the CLI's subparsers; each gets `handler(args, out) -> int`,
    and its docstring is the runnable example --help ends with."""

    def verb(name: str, help: str, handler: Handler) -> argparse.ArgumentParser:
        return add_verb(sub, name, help, [common, aws], handler.__doc__, handler)

    v = verb("status", "state, progress and cost so far", cmd_status)
    v.add_argument("job")
    v.add_argument("--plot", metavar="PNG", help="also write the loss curve here")
    v = verb("list", "recent jobs", cmd_list)
    v.add_argument("--max", type=_positive, default=20, metavar="N", help="at most N jobs (1-100)")
    v = verb("logs", "log lines and a live progress bar", cmd_logs)
    v.add_argument("job")
    v.add_argument("--follow", "-f", action="store_true")
    v = verb("stop", "stop the job; its checkpoints stay", cmd_stop)
    v.add_argument("job")
    v = verb("plot", "write a PNG of training and eval loss against steps", cmd_plot)
    v.add_argument("job")
    v.add_argument("--out", default=None, help="PNG path (default: <job>-loss.png)")
    v = verb("download", "fetch the trained adapter", cmd_download)
    v.add_argument("job")
    v.add_argument("dest")
    v = verb("merge", "the base model with the adapter merged in (bf16 safetensors), ready to serve; "
             "a small SageMaker job for SageMaker runs", cmd_merge)
    v.add_argument("job", help="the adapter job: a local run (runs/JOB) or a SageMaker training job")
    v.add_argument("dest", nargs="?", default=None,
                   help="local directory, or s3:// prefix (SageMaker; default <output.s3_uri>/merged/<job>)")
    v.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16, fp16 on GPUs without bf16")
    v.add_argument("--instance-type", default=None, help="SageMaker: override the chosen merge instance")
    v.add_argument("--wait", action="store_true", help="SageMaker: wait for the merge job (and download to DEST)")
    v.add_argument("--dry-run", action="store_true", help="print the CreateTrainingJob request (SageMaker) or the "
                   "merge command (local); write and send nothing")


__all__ = ["register"]
