"""`sm-qlora`: a thin shell over the library. Each verb is an argparse spec and a handler
side by side (`handler(args, out) -> int`); the handler calls the library and prints.

Exit codes (SPEC): 0 ok, 1 the job failed or was stopped (and any unexpected error),
2 bad config or usage, 3 AWS refused or unreachable, 130 interrupted. No traceback reaches
the user: `main` turns every error into one line (the traceback goes to a file, or to
stderr with SM_QLORA_DEBUG=1). Imports are per verb so that `--help` and `validate` never
load boto3 or the SageMaker SDK.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from typing import Any

from launcher import control
from launcher.config import load_config
from launcher.errors import ConfigError, LauncherError, disk_error
from launcher.instances import format_usd
from launcher.job import launch_job
from launcher.plan import Plan, make_plan
from launcher.preflight import exit_code, gate, preflight
from launcher.render import follow_job
from launcher.validate import validate_for_launch
from launcher.verb import add_verb

DEBUG_ENV = "SM_QLORA_DEBUG"


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


# --------------------------------------------------------------------------- validate

def cmd_validate(args, out: Printer) -> int:
    cfg = validate_for_launch(load_config(args.config, args.overrides), local=args.local)
    where = "this machine" if args.local else f"{cfg.compute.instance_type} x{cfg.compute.instance_count}"
    out.result({"valid": True, "job_name": cfg.job_name, "config_sha256": cfg.digest(), "local": args.local},
               f"{args.config}: valid for {where} (model {cfg.model.id})")
    return 0


def add_validate(sub, common, config) -> None:
    v = add_verb(sub, "validate", "check the config as `launch` would; list every problem at once", [common, config],
                 "sm-qlora validate examples/job.yaml --set training.learning_rate=1e-4", cmd_validate)
    v.add_argument("config")
    v.add_argument("--local", action="store_true", help="check it for `launch --local` (this machine)")


# --------------------------------------------------------------------------- plan

def cmd_plan(args, out: Printer) -> int:
    plan = make_plan(load_config(args.config, args.overrides), dataset_tokens=args.tokens)
    if out.json:
        out.result(plan.as_dict())
    else:
        render_plan(plan)
    return 0


def add_plan(sub, common, config) -> None:
    v = add_verb(sub, "plan", "instance fit, parallelism, time and cost estimate", [common, config],
                 "sm-qlora plan examples/job.yaml --output json", cmd_plan)
    v.add_argument("config")
    v.add_argument("--tokens", type=float, default=None, help="dataset tokens, if the data is not local")


def rich_console():
    """A rich Console for the CLI's tables and bars. On a pipe or a file it does not wrap
    at 80 columns, and a closed pipe raises BrokenPipeError (which `main` turns into a quiet
    exit 0) instead of rich's own exit 1."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)

    def broken_pipe() -> None:
        raise BrokenPipeError

    console.on_broken_pipe = broken_pipe
    return console


def render_plan(plan: Plan) -> None:
    from rich.table import Table

    console = rich_console()
    tokens = f"{plan.dataset_tokens:,.0f}" if plan.dataset_tokens else "?"
    console.print(f"[bold]{plan.model}[/bold]  shape: {plan.shape_source}")
    console.print(f"image: {plan.image}")
    console.print(f"dataset: {tokens} tokens ({plan.tokens_source}) x {plan.epochs} epoch(s); "
                  f"{plan.tokens_per_micro_batch} tokens per micro-batch on {plan.configured}")
    if plan.max_cost_usd is not None:
        console.print(f"budget: {format_usd(plan.max_cost_usd)} cap -> MaxRuntime {plan.max_runtime_hours:.1f} h on "
                      f"{plan.configured} x{plan.instance_count} (estimate {format_usd(plan.chosen.usd)})")
    table = Table(title=f"instances by estimated cost (on-demand prices as read {plan.prices_read})")
    for col in ("instance", "GPUs", "fits", "strategy", "rows", "GiB/GPU needed", "dtype", "tok/s", "hours", "cost",
                "cost spot"):
        table.add_column(col, justify="right" if col not in ("instance", "fits", "strategy", "dtype") else "left")
    for r in plan.rows:
        mark = " <- configured" if r.instance == plan.configured else ""
        if plan.cheapest_fit and r.instance == plan.cheapest_fit.instance:
            mark += " (cheapest fit)"
        table.add_row(
            r.instance + mark, f"{r.gpus}x {r.gpu} ({r.gpu_memory_gib:g} GiB)", "yes" if r.fits else "no",
            r.strategy or "does not fit", str(r.rows_per_micro_batch), f"{r.needed_gib_per_gpu:g}", r.precision,
            f"{r.tokens_per_sec:,}" if r.tokens_per_sec else "-", f"{r.hours:.1f}" if r.hours else "-",
            format_usd(r.usd), f"{format_usd(r.spot_usd[0])}-{format_usd(r.spot_usd[1])}" if r.spot_usd else "-",
            style="bold" if r.instance == plan.configured else ("dim" if not r.fits else None),
        )
    console.print(table)
    worst = max(abs(c["error_pct"]) for c in plan.calibration)
    console.print(f"memory model vs {len(plan.calibration)} measured H200 runs: max error {worst:.1f}%")
    for a in plan.assumptions:
        console.print(f"  - {a}")


# --------------------------------------------------------------------------- launch

def cmd_launch(args, out: Printer) -> int:
    if args.local and args.preflight:
        raise ConfigError([("--preflight", "checks an AWS account; --local sends nothing to AWS")])
    if args.local:  # launch_job refuses --dry-run with --local; a local run always waits
        job = launch_job(args.config, overrides=args.overrides, local=True, dry_run=args.dry_run,
                         resume=args.resume, echo=not out.json)
        out.result(job.as_dict(), f"done: adapter in {job.adapter_uri}")
        return 0
    if args.preflight and not args.dry_run:

        code = gate(load_config(args.config, args.overrides), info=out.info)
        if code:
            return code
    job = launch_job(args.config, overrides=args.overrides, dry_run=args.dry_run, resume=args.resume)
    if args.dry_run:
        out.result(job.as_dict(), json.dumps(job.request, indent=2, default=str) + "\nsource dir (sourcedir.tar.gz): "
                   + " ".join(job.submitted.source_files))
        return 0
    out.result(job.as_dict(), "\n".join([
        f"submitted {job.name}",
        f"  arn:      {job.arn}",
        f"  console:  {job.console_url}",
        f"  logs:     sm-qlora logs {job.name} --follow   ({job.log_group}, streams {job.log_stream_prefix}*)",
        f"  adapter:  {job.adapter_uri}",
    ]))
    if args.wait:
        return follow_job(job, out, follow=True)
    return 0


def add_launch(sub, common, config) -> None:
    v = add_verb(sub, "launch", "submit the training job (or --local / --dry-run)", [common, config],
                 "sm-qlora launch examples/job.yaml --dry-run\n  sm-qlora launch examples/local-tiny.yaml --local",
                 cmd_launch)
    v.add_argument("config")
    v.add_argument("--dry-run", action="store_true", help="print the CreateTrainingJob request; send nothing")
    v.add_argument("--local", action="store_true", help="run the job on this machine under runs/<job>/")
    v.add_argument("--wait", action="store_true", help="follow the job to its end")
    v.add_argument("--resume", metavar="JOB", help="continue from JOB's checkpoints")
    v.add_argument("--preflight", action="store_true", help="run the account checks first; stop if one fails")


# --------------------------------------------------------------------------- preflight

def cmd_preflight(args, out: Printer) -> int:

    checks = preflight(load_config(args.config, args.overrides))
    code = exit_code(checks)
    problems = sum(c.ok is False for c in checks)
    unchecked = sum(c.ok is None for c in checks)
    summary = ("AWS could not be reached" if code == 3 else
               f"{problems} problem(s) to fix before launching" if problems else
               f"ready to launch ({unchecked} check(s) could not be made)" if unchecked else "ready to launch")
    out.result({"ok": code == 0, "exit_code": code, "summary": summary, "checks": [c.as_dict() for c in checks]},
               "\n".join([c.line() for c in checks] + [f"preflight: {summary}"]))
    return code


def add_preflight(sub, common, config) -> None:
    """No --region/--profile: the config names the region and profile (`--set aws.region=...`)."""
    v = add_verb(sub, "preflight", "account-side checks before paying: credentials, role + trust + PassRole, "
                 "bucket, quota, token secret", [common, config],
                 "sm-qlora preflight examples/job.yaml --output json", cmd_preflight)
    v.add_argument("config")


# --------------------------------------------------------------------------- init

def cmd_init(args, out: Printer) -> int:
    from launcher.starter import write_starter

    files = write_starter(args.dest)
    local, sagemaker = (str(p) for p in files[:2])
    out.result({"files": [str(p) for p in files]}, "\n".join(
        [f"wrote {p}" for p in files] + ["next:",
         f"  sm-qlora launch {local} --local      # on this machine (needs pip install 'sagemaker-qlora[train]')",
         f"  sm-qlora plan {sagemaker}            # after putting your bucket and role in it",
         f"  sm-qlora launch {sagemaker}"]))
    return 0


def add_init(sub, common, config) -> None:
    v = add_verb(sub, "init", "write a commented starter job (a local and a SageMaker variant) and a small dataset",
                 [common], "sm-qlora init my-job/", cmd_init)
    v.add_argument("dest", nargs="?", default=".", help="directory to write into (default: here)")


# --------------------------------------------------------------------------- the parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sm-qlora", description="Fine-tune LLMs with QLoRA on Amazon SageMaker.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  sm-qlora launch examples/job.yaml --dry-run")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", choices=["text", "json"], default="text", help="json: one JSON object on stdout")
    config = argparse.ArgumentParser(add_help=False)  # only for the verbs that read a config
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config field (repeatable; a {mapping} merges into its section)")
    aws = argparse.ArgumentParser(add_help=False)
    aws.add_argument("--region", default=None)
    aws.add_argument("--profile", default=None)
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in (add_validate, add_plan, add_launch, add_preflight, add_init):
        add(sub, common, config)
    control.register(sub, common, aws)
    return p


# --------------------------------------------------------------------------- main

def known_error(exc: BaseException) -> LauncherError | None:
    """An error of the world, not of the launcher, that escaped a verb: AWS (exit 3) or the
    disk (exit 1), said in one line. None for a real bug."""
    if isinstance(exc, LauncherError):
        return exc
    if type(exc).__module__.startswith(("botocore.", "boto3.")):
        from launcher.aws import translated

        try:
            with translated("AWS"):
                raise exc
        except LauncherError as err:
            return err
    if isinstance(exc, OSError) and exc.filename is not None:
        return disk_error(exc)
    return None


def _report(exc: BaseException, out: Printer) -> int:
    exc = known_error(exc) or exc
    if isinstance(exc, LauncherError):
        if out.json:
            print(json.dumps({"error": type(exc).__name__, "message": exc.message, "hint": exc.hint,
                              "problems": [{"path": p, "message": m} for p, m in getattr(exc, "problems", [])]}))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    text = "".join(traceback.format_exception(exc))
    if os.environ.get(DEBUG_ENV) == "1":
        where = "above"
        sys.stderr.write(text)
    else:
        try:
            fd, where = tempfile.mkstemp(prefix="sm-qlora-", suffix=".traceback")
            with os.fdopen(fd, "w") as f:
                f.write(text)
        except OSError as err:  # a full or read-only disk: say so, still in one line
            where = f"not kept ({err.strerror})"
    message = f"unexpected {type(exc).__name__}: {str(exc)[:300]} (a bug: the traceback is {where}; " \
              f"{DEBUG_ENV}=1 prints it)"
    if out.json:
        print(json.dumps({"error": type(exc).__name__, "message": message, "hint": None, "problems": []}))
    else:
        print(f"error: {message}", file=sys.stderr)
    return 1


def _quiet_stdout() -> None:
    """The reader went away (`sm-qlora plan | head`): drop the rest of the output, as
    standard tools do, instead of a BrokenPipeError at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    out = Printer("text")
    try:
        args = build_parser().parse_args(argv)
        out = Printer(args.output)
        code = args.handler(args, out)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # LauncherError, and the guard: no traceback reaches the user
        try:
            return _report(exc, out)
        except BrokenPipeError:
            _quiet_stdout()
            return getattr(exc, "exit_code", 1)


if __name__ == "__main__":
    raise SystemExit(main())
