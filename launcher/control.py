"""The CLI verbs that act on an existing job: status, list, logs, stop, plot, download.
Each one parses nothing and prints what a `Job` method returns."""

from __future__ import annotations

from launcher.job import Job


def _job(args) -> Job:
    return Job.attach(args.job, region=args.region, profile=args.profile)


def _money(cost: dict) -> str:
    return f"${cost['usd']:.2f}" if cost.get("usd") is not None else "-"


def cmd_status(args, out) -> int:
    job = _job(args)
    s = job.summary()
    if args.plot:
        s["plot"] = str(job.plot(args.plot))
    step = f"{s['step']}/{s['total_steps']}" if s["total_steps"] else str(s["step"] or "-")
    text = [
        f"{s['job_name']}: {s['status']} ({s['secondary_status']})" + (" [local]" if s["local"] else ""),
        f"  progress: step {step}  loss {s['loss'] or '-'}  eval_loss {s['eval_loss'] or '-'}  eta {s['eta'] or '-'}",
        f"  elapsed:  {s['elapsed_s'] if s['elapsed_s'] is not None else '-'} s   cost so far: {_money(s['cost'])}"
        + (f" ({s['instance_type']} x{s['cost']['instance_count']})" if s["instance_type"] else ""),
    ]
    if s["failure_reason"]:
        text.append(f"  reason:   {s['failure_reason']}")
    if s["adapter"]:
        text.append(f"  adapter:  {s['adapter']}")
    if args.plot:
        text.append(f"  plot:     {s['plot']}")
    out.result(s, "\n".join(text))
    return 0


def cmd_list(args, out) -> int:
    from launcher.local import read_state, runs_dir

    rows = []
    root = runs_dir()
    if root.is_dir():
        for d in sorted(root.iterdir(), reverse=True):
            state = read_state(d)
            if state:
                rows.append({"job_name": d.name, "status": state.get("status"), "where": "local",
                             "created": state.get("started")})
    from launcher.aws import client, translated

    try:
        sm = client("sagemaker", args.region, args.profile)
        with translated("list training jobs"):
            page = sm.list_training_jobs(SortBy="CreationTime", SortOrder="Descending", MaxResults=min(args.max, 100))
        rows += [{"job_name": j["TrainingJobName"], "status": j["TrainingJobStatus"], "where": "sagemaker",
                  "created": j["CreationTime"].timestamp()} for j in page["TrainingJobSummaries"]]
    except Exception as exc:  # no credentials: still list local runs, and say why AWS is missing
        if not rows:
            raise
        out.info(f"(SageMaker jobs not listed: {exc})")
    rows = sorted(rows, key=lambda r: r["created"] or 0, reverse=True)[: args.max]
    if out.json:
        out.result({"jobs": rows})
        return 0
    from datetime import datetime, timezone

    from rich.console import Console
    from rich.table import Table

    table = Table("job", "status", "where", "created (UTC)")
    for r in rows:
        created = datetime.fromtimestamp(r["created"], timezone.utc).strftime("%Y-%m-%d %H:%M") if r["created"] else "-"
        table.add_row(r["job_name"], r["status"] or "?", r["where"], created)
    Console().print(table)
    return 0


def cmd_logs(args, out) -> int:
    return _job(args).logs(follow=args.follow, as_json=out.json)


def cmd_stop(args, out) -> int:
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
    job = _job(args)
    path = job.plot(args.out)
    out.result({"job_name": job.name, "plot": str(path)}, f"wrote {path}")
    return 0


def cmd_download(args, out) -> int:
    job = _job(args)
    files = job.download(args.dest)
    out.result({"job_name": job.name, "dest": args.dest, "files": [str(f) for f in files]},
               f"downloaded {len(files)} files from {job.adapter_uri} to {args.dest}")
    return 0
