"""`sm-qlora`: a thin shell over `launch_job()` and `Job`. It parses arguments, calls the
library, prints, and maps errors to the SPEC's exit codes (0 ok, 1 job failed/stopped,
2 bad config or usage, 3 AWS, 130 interrupted). Imports are per verb so that `--help`
and `validate` never load boto3 or the SageMaker SDK.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXAMPLES = {
    "validate": "sm-qlora validate examples/job.yaml --set training.learning_rate=1e-4",
    "plan": "sm-qlora plan examples/job.yaml --output json",
    "launch": "sm-qlora launch examples/job.yaml --dry-run\n  sm-qlora launch examples/local-tiny.yaml --local",
    "status": "sm-qlora status medical-mixtral-20261129-101500 --output json",
    "list": "sm-qlora list --max 20",
    "logs": "sm-qlora logs medical-mixtral-20261129-101500 --follow",
    "stop": "sm-qlora stop medical-mixtral-20261129-101500",
    "plot": "sm-qlora plot medical-mixtral-20261129-101500 --out loss.png",
    "download": "sm-qlora download medical-mixtral-20261129-101500 ./adapter",
}


class Printer:
    def __init__(self, fmt: str):
        self.json = fmt == "json"

    def result(self, obj: dict[str, Any], text: str | None = None) -> None:
        if self.json:
            print(json.dumps(obj, default=str))
        elif text is not None:
            print(text)

    def info(self, text: str) -> None:
        """Human chatter goes to stderr so that stdout stays one JSON object."""
        print(text, file=sys.stderr if self.json else sys.stdout, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sm-qlora", description="Fine-tune LLMs with QLoRA on Amazon SageMaker.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  sm-qlora launch examples/job.yaml --dry-run")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", choices=["text", "json"], default="text", help="json: one JSON object on stdout")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config field (repeatable)")
    aws = argparse.ArgumentParser(add_help=False)
    aws.add_argument("--region", default=None)
    aws.add_argument("--profile", default=None)
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str, parents: list) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=parents,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=f"example:\n  {EXAMPLES[name]}")

    v = verb("validate", "check the config; list every problem at once", [common])
    v.add_argument("config")
    v = verb("plan", "instance fit, parallelism, time and cost estimate", [common])
    v.add_argument("config")
    v.add_argument("--tokens", type=float, default=None, help="dataset tokens, if the data is not local")
    v = verb("launch", "submit the training job (or --local / --dry-run)", [common])
    v.add_argument("config")
    v.add_argument("--dry-run", action="store_true", help="print the CreateTrainingJob request; send nothing")
    v.add_argument("--local", action="store_true", help="run the job on this machine under runs/<job>/")
    v.add_argument("--wait", action="store_true", help="follow the job to its end")
    v.add_argument("--resume", metavar="JOB", help="continue from JOB's checkpoints")
    v = verb("status", "state, progress and cost so far", [common, aws])
    v.add_argument("job")
    v.add_argument("--plot", metavar="PNG", help="also write the loss curve here")
    v = verb("list", "recent jobs", [common, aws])
    v.add_argument("--max", type=int, default=20)
    v = verb("logs", "log lines and a live progress bar", [common, aws])
    v.add_argument("job")
    v.add_argument("--follow", "-f", action="store_true")
    v = verb("stop", "stop the job; its checkpoints stay", [common, aws])
    v.add_argument("job")
    v = verb("plot", "write a PNG of training and eval loss against steps", [common, aws])
    v.add_argument("job")
    v.add_argument("--out", default=None, help="PNG path (default: <job>-loss.png)")
    v = verb("download", "fetch the trained adapter", [common, aws])
    v.add_argument("job")
    v.add_argument("dest")
    return p


def cmd_validate(args, out: Printer) -> int:
    from launcher.config import load_config
    from launcher.plan import check_fits

    cfg = load_config(args.config, args.overrides)
    check_fits(cfg)
    out.result({"valid": True, "job_name": cfg.job_name, "config_sha256": cfg.digest()},
               f"{args.config}: valid ({cfg.compute.instance_type} x{cfg.compute.instance_count}, "
               f"model {cfg.model.id})")
    return 0


def cmd_plan(args, out: Printer) -> int:
    from launcher.config import load_config
    from launcher.plan import make_plan, render_plan

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, dataset_tokens=args.tokens)
    if out.json:
        out.result(plan.as_dict())
    else:
        render_plan(plan)
    return 0


def cmd_launch(args, out: Printer) -> int:
    from launcher.job import launch_job

    if args.local:  # launch_job refuses --dry-run with --local
        job = launch_job(args.config, overrides=args.overrides, local=True, dry_run=args.dry_run,
                         resume=args.resume, echo=not out.json)
        out.result(job.as_dict(), f"done: adapter in {job.adapter_uri}")
        return 0
    job = launch_job(args.config, overrides=args.overrides, dry_run=args.dry_run, resume=args.resume)
    if args.dry_run:
        out.result(job.as_dict(), json.dumps(job.request, indent=2, default=str))
        return 0
    out.result(job.as_dict(), "\n".join([
        f"submitted {job.name}",
        f"  arn:      {job.arn}",
        f"  console:  {job.console_url}",
        f"  logs:     sm-qlora logs {job.name} --follow   ({job.log_group}, streams {job.log_stream_prefix}*)",
        f"  adapter:  {job.adapter_uri}",
    ]))
    if args.wait:
        return job.logs(follow=True, as_json=out.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    args = _parser().parse_args(argv)
    out = Printer(args.output)
    from launcher.errors import LauncherError

    handlers = {"validate": cmd_validate, "plan": cmd_plan, "launch": cmd_launch}
    try:
        if args.verb in handlers:
            return handlers[args.verb](args, out)
        from launcher import control

        return getattr(control, f"cmd_{args.verb}")(args, out)
    except LauncherError as exc:
        if out.json:
            print(json.dumps({"error": type(exc).__name__, "message": exc.message, "hint": exc.hint,
                              "problems": [{"path": p, "message": m} for p, m in getattr(exc, "problems", [])]}))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
