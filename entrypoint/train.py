"""The QLoRA training job as one recipe, top to bottom: read and check the
hyperparameters SageMaker hands the container, load the data, load the base model in
4-bit, attach LoRA, train with checkpoints, save the adapter to SM_MODEL_DIR.

Runs as `python -m entrypoint` (local runner), as the Estimator's entry script, or under
torchrun (one process per GPU, rank 0 alone writes). Progress goes to stdout as the
SPEC's `[train] step=...` lines, which CloudWatch, the metric regexes and `sm-qlora
logs` all read.

The hyperparameters are checked before torch is imported, so a bad value fails in about
a second. Stops: SIGTERM (StopTrainingJob, spot) checkpoints and exits 143; the clock
(`training.checkpoint_minutes`) checkpoints so that a SIGKILL loses at most that much;
nearing MaxRuntimeInSeconds the job checkpoints, saves the adapter and exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from entrypoint import container, progress, stopping
from entrypoint.hyperparams import (
    PINNED_HOST_SHARE,
    Hyperparameters,
    offload_fits_host,
    offloaded_checkpoint_bytes,
    unflatten,
)
from entrypoint.progress import emit, fail, train_line

EXIT_BAD_INPUT = container.EXIT_BAD_INPUT
EXIT_STOPPED = container.EXIT_STOPPED
_PROCESS_STARTED = time.time()  # a failure file older than this is a previous run's
MIN_STOP_MARGIN_S = 120.0  # before MaxRuntime; or 3x the last checkpoint's time, if longer


class BadInput(Exception):
    """The job cannot start with what it was given: fail at once, one line in the log."""


class TrainingDiverged(Exception):
    """The loss stopped being a number: the adapter would be garbage, so the job fails."""


class Interrupt:
    """Set by SIGTERM (spot interruption, StopTrainingJob, Ctrl-C through the local
    runner); the training loop checks it between micro-batches."""

    def __init__(self):
        self.signum: int | None = None
        self.reason = ""  # what the [stopped] line says
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum, self.reason = signum, f"signal_{signum}"

    def job_stopping(self) -> None:
        """SageMaker says the job is Stopping, and no signal will come (entrypoint/stopping.py)."""
        self.signum, self.reason = signal.SIGTERM, "job_stopping"

    def __bool__(self) -> bool:
        return self.signum is not None


# --------------------------------------------------------------------------- the container contract

def read_hyperparameters() -> Hyperparameters:
    """/opt/ml/input/config/hyperparameters.json (values JSON-encoded by the Estimator),
    else SM_HPS (decoded); validated by the launcher's own model."""
    from pydantic import ValidationError

    path = container.input_config_dir() / "hyperparameters.json"
    if path.is_file():
        raw = unflatten(json.loads(path.read_text()), encoded=True)
    elif container.HPS in os.environ:
        raw = unflatten(json.loads(os.environ[container.HPS]), encoded=False)
    else:
        raise BadInput(f"no hyperparameters: {path} is missing and {container.HPS} is not set")
    try:
        return Hyperparameters.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise BadInput(f"invalid hyperparameters: {problems}") from None


def channel(name: str) -> str | None:
    path = os.environ.get(container.channel_env(name))
    return path if path and Path(path).exists() and any(Path(path).iterdir()) else None


def hf_token() -> str | None:
    """HF_TOKEN, a variable the user named (local runs), or a Secrets Manager secret whose
    ARN the launcher passed. The token is never printed or written."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    named = os.environ.get(container.HF_TOKEN_ENV)
    if named:
        if not os.environ.get(named):
            raise BadInput(f"aws.hf_token_env names {named}, which is not set")
        return os.environ[named]
    arn = os.environ.get(container.HF_TOKEN_SECRET)
    if not arn:
        return None
    import boto3

    region = arn.split(":")[3]
    try:
        secret = boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=arn)["SecretString"]
    except Exception as exc:
        raise BadInput(f"could not read the HF token secret {arn}: {type(exc).__name__}: {exc}") from None
    with contextlib.suppress(json.JSONDecodeError, AttributeError):
        parsed = json.loads(secret)
        if isinstance(parsed, dict):
            secret = parsed.get("HF_TOKEN") or parsed.get("token") or next(iter(parsed.values()))
    os.environ["HF_TOKEN"] = secret  # for hub downloads in this process only
    return secret


# --------------------------------------------------------------------------- the pieces the recipe holds

@dataclass
class DistContext:
    """Where this process sits: one process, or one rank of torchrun. The collective
    calls do nothing on one process, so the recipe reads the same either way."""

    rank: int
    world: int
    local_rank: int
    device: Any  # torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, kind: str, **pairs: object) -> None:
        if self.is_main:
            emit(kind, **pairs)

    def all_reduce(self, tensor):
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any_rank(self, *flags: bool) -> bool | tuple[bool, ...]:
        """Each flag true on every rank when it is true on any (one collective for all of
        them): stop and checkpoint decisions are taken together, or the ranks' collectives
        fall out of step and hang. One flag gives a bool, several a tuple."""
        if self.world == 1:
            agreed = tuple(bool(f) for f in flags)
        else:
            import torch

            votes = self.all_reduce(torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device))
            agreed = tuple(v > 0 for v in votes.tolist())
        return agreed[0] if len(agreed) == 1 else agreed

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


@dataclass
class Batches:
    tokenizer: Any
    pad_id: int
    rows: list          # packed rows (or one example each) of the training set
    val_rows: list
    report: Any         # data.DataReport
    packing: bool


@dataclass
class Model:
    net: Any            # what forward and backward run on: DDP-wrapped under torchrun
    peft: Any           # the PeftModel inside it: what checkpoints and the adapter save
    params: list        # the trainable (LoRA) parameters
    precision: Any      # model.Precision
    trainable: int
    autocast: Any


@dataclass
class Optim:
    optimizer: Any
    scheduler: Any
    scaler: Any         # GradScaler for fp16, else None
    total_steps: int
    steps_per_epoch: int
    eval_every: int | None
    max_grad_norm: float


@dataclass
class History:
    train_loss: list = field(default_factory=list)  # [step, loss]
    eval_loss: list = field(default_factory=list)


@dataclass
class Clock:
    """When to checkpoint by time, and when MaxRuntime is too close to go on. Rank 0's
    clock decides; the loop makes every rank agree."""

    started: float
    every_s: float
    deadline: float | None          # started + MaxRuntimeInSeconds, when the launcher set one
    last_checkpoint: float = 0.0
    checkpoint_s: float = 0.0       # how long the last checkpoint took

    def checkpoint_due(self, now: float) -> bool:
        return now - self.last_checkpoint >= self.every_s

    def margin_s(self) -> float:
        return max(MIN_STOP_MARGIN_S, 3 * self.checkpoint_s)

    def budget_low(self, now: float) -> bool:
        return self.deadline is not None and self.deadline - now < self.margin_s()


@dataclass
class Window:
    """What the next [train] line reports: the steps since the last one."""

    loss: float = 0.0
    tokens: int = 0
    steps: int = 0
    since: float = field(default_factory=time.time)


@dataclass
class StepResult:
    loss: float
    tokens: int
    grad_norm: float
    seconds: float


# --------------------------------------------------------------------------- main

def main() -> None:
    interrupt = Interrupt()  # first: a stop during model loading must not be lost
    started = time.time()
    sys.exit(run_job(interrupt, started))


def run_job(interrupt: Interrupt, started: float) -> int:
    try:
        hp = read_hyperparameters()  # before torch: a bad value fails in a second
    except BadInput as exc:
        return record_failure(str(exc), EXIT_BAD_INPUT)
    if hp.training.per_device_batch_size == "auto":  # the launcher resolves it; sent by hand, 1 row
        hp.training.per_device_batch_size = 1
    _quiet_progress_bars()
    from entrypoint.checkpoints import AdapterMismatch
    from entrypoint.data import DataError
    from entrypoint.model import QuantizationError

    try:
        return recipe(hp, interrupt, started)
    except (BadInput, DataError, QuantizationError, AdapterMismatch) as exc:
        return record_failure(str(exc), EXIT_BAD_INPUT)
    except TrainingDiverged as exc:
        return record_failure(str(exc), container.EXIT_FAILED)
    except Exception as exc:  # anything else: the traceback to the log, the cause in words to FailureReason
        full = out_of_space(exc)
        if full is not None:
            return record_failure(f"no space left on {full}: free some there (on SageMaker: a larger "
                                  "compute.volume_size_gb, or fewer checkpoints kept)", container.EXIT_FAILED)
        traceback.print_exc()
        return record_failure(unexpected(exc, hp), container.EXIT_FAILED)


def out_of_space(exc: BaseException) -> Path | None:
    """Which of the job's directories filled up, when `exc` says a disk did: an OSError, or
    the same error inside safetensors' or torch's own exception (they keep only its text).
    The directory is the one with the least space left: staging files are gone by now."""
    nospace = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not (nospace or "No space left on device" in str(exc) or "os error 28" in str(exc)):
        return None
    dirs = [d for d in (container.model_dir(), container.checkpoint_dir(), container.output_dir()) if d.is_dir()]
    return min(dirs, key=lambda d: shutil.disk_usage(d).free) if dirs else container.OPT_ML


def unexpected(exc: Exception, hp: Hyperparameters) -> str:
    """A failure nobody checked for, in a user's words: what went wrong and what to try."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    cause = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if isinstance(exc, OSError) and ("huggingface.co" in str(exc) or hp.model.id in str(exc)):
        return (f"model.id {hp.model.id} could not be loaded ({cause[:300]}). The job may have no internet: "
                "give model.id as an s3:// prefix, check the id and model.revision, or set aws.hf_token_secret "
                "for a gated model")
    return f"the job failed: {cause[:600]}. The traceback is in the job's log (sm-qlora logs JOB)"


def record_failure(reason: str, code: int) -> int:
    """One line in the log, and /opt/ml/output/failure, which SageMaker shows as FailureReason
    (its first 1024 characters): the cause and its hint on the first line, nothing more. The
    first process of this run to fail writes it (a rank that fails because another did keeps
    quiet); the toolkit writes its own only when none is there."""
    line = " ".join(reason.split())
    with contextlib.suppress(OSError):  # a full disk may refuse the log line too
        fail(line)
    path = container.output_dir() / "failure"
    if path.is_file() and path.stat().st_mtime >= _PROCESS_STARTED:
        return code
    # written aside and renamed: on a full disk a direct write would leave an empty file, which
    # the toolkit keeps (it writes its own only when none is there) and the other ranks skip
    partial = path.with_name("failure.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(line[: container.FAILURE_MAX_CHARS - 1] + "\n")
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()
    return code


BNB_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def quiet_hub_kernel_warning() -> None:
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 tries, as it is imported, to fetch an
    optional kernel from the Hub and warns on every run when the `kernels` package is
    absent; the fallback it then uses is its own CPU kernel, so the warning is noise here."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith(BNB_HUB_KERNEL_WARNING))


def _quiet_progress_bars() -> None:
    """tqdm bars write carriage returns into CloudWatch; the SPEC's lines are the progress."""
    quiet_hub_kernel_warning()
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def recipe(hp: Hyperparameters, interrupt: Interrupt, started: float) -> int:
    from transformers import set_seed

    ctx = setup_dist(hp)
    if ctx.is_main:  # a tuning job's training job: its stop is never signalled
        stopping.watch(interrupt.job_stopping, ctx.say)
    set_seed(hp.training.seed)
    token = hf_token()
    batches = setup_data(hp, ctx, token)
    model = setup_model(hp, ctx, token)
    optim = setup_optimizer(hp, ctx, model, batches)
    step, history = resume(ctx, model, optim)
    clock = Clock(started, hp.training.checkpoint_minutes * 60, _deadline(started), last_checkpoint=time.time())
    step, code = train(hp, ctx, model, optim, batches, clock, interrupt, step, history)
    if code == 0:
        save_adapter(hp, ctx, model, batches, history, step, started)
    ctx.close()
    return code


def _deadline(started: float) -> float | None:
    max_runtime = container.max_runtime_s()
    return container.container_started(started) + max_runtime if max_runtime else None


# --------------------------------------------------------------------------- setup

def setup_dist(hp: Hyperparameters) -> DistContext:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process without it."""
    import torch

    world = int(os.environ.get(container.WORLD_SIZE, "1"))
    rank = int(os.environ.get(container.RANK, "0"))
    local_rank = int(os.environ.get(container.LOCAL_RANK, "0"))
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    ctx = DistContext(rank, world, local_rank, device)
    ctx.say("info", job=os.environ.get(container.JOB_NAME, os.environ.get(container.TRAINING_JOB_NAME, "local")),
            world=world, strategy=_strategy(hp, world), device=device.type, gpus=torch.cuda.device_count(),
            hosts=len(json.loads(os.environ.get(container.HOSTS, '["algo-1"]'))))
    return ctx


def _strategy(hp: Hyperparameters, world: int) -> str:
    if hp.strategy != "auto":
        return hp.strategy
    return "ddp" if world > 1 else "single"


def setup_data(hp: Hyperparameters, ctx: DistContext, token: str | None) -> Batches:
    from transformers import AutoTokenizer

    from entrypoint import data

    t = hp.training
    tokenizer = AutoTokenizer.from_pretrained(channel("model") or hp.model.id, token=token, revision=hp.model.revision,
                                              trust_remote_code=hp.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train, report = data.load_examples(channel("train") or hp.data.train, hp.data, tokenizer, t.max_seq_length,
                                       token, shown_as=hp.data.train)
    if hp.data.validation or channel("validation"):
        val, _ = data.load_examples(channel("validation") or hp.data.validation, hp.data, tokenizer,
                                    t.max_seq_length, token, shown_as=hp.data.validation)
    else:
        train, val = data.split_validation(train, hp.data.validation_split, t.seed)
    if not train:
        raise BadInput(f"{hp.data.train}: no training examples left after truncation")
    rows = data.units(train, t.max_seq_length, t.packing)
    row_tokens = sum(len(e.input_ids) for r in rows for e in r)
    ctx.say("data", examples=report.examples, train=len(train), validation=len(val),
            truncated=report.truncated, dropped=report.dropped, tokens=report.tokens,
            label_tokens=report.label_tokens, rows=len(rows),
            fill=f"{row_tokens / (len(rows) * t.max_seq_length):.2f}" if t.packing else "n/a",
            packing=t.packing, template=report.template.split(" ")[0])
    return Batches(tokenizer, pad_id, rows, data.units(val, t.max_seq_length, t.packing), report, t.packing)


def setup_model(hp: Hyperparameters, ctx: DistContext, token: str | None) -> Model:
    """The 4-bit base, checked to really be 4-bit, then LoRA; DDP-wrapped under torchrun."""
    import torch

    from entrypoint import model as models
    from entrypoint.head import describe as describe_loss
    from entrypoint.moe import describe as describe_moe
    from entrypoint.offload import describe as describe_checkpoints
    from entrypoint.projections import describe as describe_projections

    device = ctx.device
    if _strategy(hp, ctx.world) == "model_parallel" and torch.cuda.device_count() > 1 and ctx.world == 1:
        device_map = "auto"
    else:
        device_map = {"": device.index if device.type == "cuda" else "cpu"}
    precision = models.choose_precision(device)
    attn = models.attention_implementation(device)
    ctx.say("model", precision=precision.name, reason=precision.reason, attention=attn)
    base = models.load_4bit(channel("model") or hp.model.id, precision, device_map, attn, token=token,
                            revision=hp.model.revision, trust_remote_code=hp.model.trust_remote_code)
    quant = models.check_quantized(base)
    one_cpu_kernel(base)
    offload = hp.training.offload_checkpoints and _host_holds_checkpoints(hp, ctx, base.config)
    peft_model = models.attach_lora(base, hp.lora, hp.training.model_copy(update={"offload_checkpoints": offload}))
    trainable, total = models.parameter_counts(peft_model)
    moe_path, projections, loss_path = describe_moe(peft_model), describe_projections(peft_model), describe_loss(peft_model)
    lora = peft_model.peft_config["default"]
    ctx.say("model", **quant, trainable=trainable, total=total,  # quant: experts=nf4 expert_matrices=N on MoE
            trainable_pct=f"{100 * trainable / total:.3f}",
            targets=",".join([*lora.target_modules, *(lora.target_parameters or [])]),
            checkpoints=describe_checkpoints(peft_model),
            **({"moe": moe_path.replace(" ", "_")} if moe_path else {}),
            **({"projections": projections.replace(" ", "_")} if projections else {}),
            **({"small_ops": "compiled"} if getattr(peft_model, "compiled_small_ops", 0) else {}),
            **({"loss": loss_path} if loss_path else {}))
    net = peft_model
    if ctx.world > 1:
        # find_unused_parameters: an expert that no token was routed to gets no gradient.
        net = torch.nn.parallel.DistributedDataParallel(
            peft_model, device_ids=[ctx.local_rank] if device.type == "cuda" else None, find_unused_parameters=True)
    autocast = torch.autocast("cuda", dtype=precision.dtype) if device.type == "cuda" else contextlib.nullcontext()
    params = [p for p in net.parameters() if p.requires_grad]
    return Model(net, peft_model, params, precision, trainable, autocast)


def one_cpu_kernel(model) -> None:
    """bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a 4-bit layer for a bf16 kernel
    the first time it runs in eval without grad, and keeps it so: training after an
    evaluation would run on other numerics than training without one. The job trains and
    evaluates on the one path training uses."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _host_holds_checkpoints(hp: Hyperparameters, ctx: DistContext, config) -> bool:
    """Whether this host's memory holds the offloaded checkpoints of every process on it (the
    launcher's plan applies the same rule to the instance it picks); if not, say so."""
    t = hp.training
    tokens = t.per_device_batch_size * t.max_seq_length
    processes = int(os.environ.get(container.LOCAL_WORLD_SIZE, "1"))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if offload_fits_host(tokens, config.num_hidden_layers, config.hidden_size, processes, host):
        return True
    need = offloaded_checkpoint_bytes(tokens, config.num_hidden_layers, config.hidden_size, processes)
    ctx.say("info", checkpoints="gpu", reason="host_memory", pinned_gib_needed=f"{need / 2**30:.1f}",
            host_gib=f"{host / 2**30:.1f}", pinned_share_allowed=f"{PINNED_HOST_SHARE:g}")
    return False


def setup_optimizer(hp: Hyperparameters, ctx: DistContext, model: Model, batches: Batches) -> Optim:
    import torch
    from transformers import get_scheduler

    t = hp.training
    kind = t.optimizer if t.optimizer != "auto" else ("adamw_8bit" if ctx.device.type == "cuda" else "adamw_torch")
    if kind in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        from entrypoint.optim import adamw_8bit

        cls = bnb.optim.PagedAdamW8bit if kind == "paged_adamw_8bit" else adamw_8bit()
        optimizer = cls(model.params, lr=t.learning_rate, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.params, lr=t.learning_rate, weight_decay=t.weight_decay)
    micro_per_epoch = math.ceil((len(batches.rows) // ctx.world) / t.per_device_batch_size)
    if micro_per_epoch == 0:
        raise BadInput(f"{len(batches.rows)} training rows cannot feed {ctx.world} processes")
    steps_per_epoch = math.ceil(micro_per_epoch / t.gradient_accumulation_steps)
    total_steps = t.max_steps or steps_per_epoch * t.epochs
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if model.precision.name == "fp16" else None
    eval_every = t.eval_steps or (t.save_steps if batches.val_rows else None)
    return Optim(optimizer, scheduler, scaler, total_steps, steps_per_epoch, eval_every, t.max_grad_norm)


def resume(ctx: DistContext, model: Model, optim: Optim) -> tuple[int, History]:
    """From the newest checkpoint that counts (a stopped job, or a spot restart), if any,
    saying which newer ones it skipped and why. A checkpoint of another adapter shape
    fails the job (checkpoints.AdapterMismatch): resuming it would mix two adapters."""
    from entrypoint import checkpoints

    root = container.checkpoint_dir()
    refused: set[Path] = set()
    while True:
        newest, skipped = checkpoints.newest_valid(root, exclude=refused)
        for name, why in skipped if ctx.is_main else ():
            progress.skipped(name, why)
        if newest is None:
            return 0, History()
        try:
            state = checkpoints.load(newest, model.peft, optim.optimizer, optim.scheduler, optim.scaler,
                                     ctx.rank, ctx.world)
        except checkpoints.Invalid as why:
            if ctx.is_main:
                progress.skipped(newest.name, str(why))
            refused.add(newest)
            continue
        ctx.say("resume", step=state["step"], path=newest)
        return state["step"], History(**state.get("history", {}))


# --------------------------------------------------------------------------- the loop

def train(hp: Hyperparameters, ctx: DistContext, model: Model, optim: Optim, batches: Batches, clock: Clock,
          interrupt: Interrupt, step: int, history: History) -> tuple[int, int]:
    """Train from `step` to the end. Returns (the step reached, the exit code)."""
    from entrypoint import checkpoints, data

    t = hp.training
    model.net.train()
    window, step_times = Window(), []
    while step < optim.total_steps:
        epoch = step // optim.steps_per_epoch
        micro = data.batches_for_epoch(batches.rows, t.per_device_batch_size, t.seed, epoch, ctx.rank, ctx.world)
        groups = [micro[i: i + t.gradient_accumulation_steps]
                  for i in range(0, len(micro), t.gradient_accumulation_steps)]
        for group in groups[step % optim.steps_per_epoch:]:
            if step >= optim.total_steps:
                break
            rng_at_start = checkpoints.rng_state()  # a checkpoint of this step replays from here
            result = train_step(ctx, model, optim, batches, group, interrupt, step)
            if result is None:  # SIGTERM between micro-batches: save what the last step left
                seconds = checkpoint(hp, ctx, model, optim, clock, step, rng_at_start, history)
                ctx.say("stopped", step=step, reason=interrupt.reason, checkpoint_s=f"{seconds:.2f}")
                return step, EXIT_STOPPED
            step += 1
            step_times.append(result.seconds)
            window.loss += result.loss
            window.tokens += result.tokens
            window.steps += 1

            if step % t.logging_steps == 0 or step == optim.total_steps:
                log_step(ctx, optim, history, window, step, result.grad_norm, step_times[-20:])
                window = Window()
            if optim.eval_every and (step % optim.eval_every == 0 or step == optim.total_steps):
                eval_loss = evaluate(ctx, model, batches, t.per_device_batch_size)
                if eval_loss is not None:
                    history.eval_loss.append([step, round(eval_loss, 6)])
                    ctx.say("eval", step=f"{step}/{optim.total_steps}", eval_loss=f"{eval_loss:.4f}")
            # Rank 0's clock decides; every rank takes the same branch.
            now = time.time()
            stop, budget_low, by_clock = ctx.any_rank(
                bool(interrupt), ctx.is_main and clock.budget_low(now), ctx.is_main and clock.checkpoint_due(now))
            budget_low = budget_low and step < optim.total_steps
            on_schedule = step % t.save_steps == 0
            if ((on_schedule or by_clock) and step < optim.total_steps) or stop or budget_low:
                checkpoint(hp, ctx, model, optim, clock, step, checkpoints.rng_state(), history,
                           reason=None if on_schedule or not by_clock else "clock")
            if stop or budget_low:
                ctx.say("stopped", step=step, reason=interrupt.reason if stop else "max_runtime",
                        checkpoint_s=f"{clock.checkpoint_s:.2f}")
                return step, EXIT_STOPPED if stop else container.EXIT_OK
    return step, container.EXIT_OK


def train_step(ctx: DistContext, model: Model, optim: Optim, batches: Batches, group: list,
               interrupt: Interrupt, step: int) -> StepResult | None:
    """One optimizer step over `group`'s micro-batches; None when a stop came first."""
    import torch

    from entrypoint import data

    started = time.time()
    tensors = [_to(_collate(mb, batches), ctx.device) for mb in group]
    n_items = sum(int((b["labels"][:, 1:] != data.IGNORE).sum()) for b in tensors)
    tokens = sum(len(e.input_ids) for mb in group for row in mb for e in row)  # data, not padding
    step_loss = 0.0
    for j, batch in enumerate(tensors):
        sync = ctx.world == 1 or j == len(tensors) - 1
        with (contextlib.nullcontext() if sync else model.net.no_sync()), model.autocast:
            # num_items_in_batch: the loss is summed over tokens and divided by the step's
            # label count, so packed rows of unequal fill weigh each token alike.
            loss = model.net(**batch, use_cache=False, num_items_in_batch=max(n_items, 1)).loss
        (optim.scaler.scale(loss) if optim.scaler else loss).backward()
        step_loss += loss.detach().item()
        if ctx.any_rank(bool(interrupt)):
            return None
    if ctx.any_rank(not math.isfinite(step_loss)):
        raise TrainingDiverged(
            f"non-finite loss ({step_loss}) at step {step + 1}; the adapter would be garbage. "
            "Lower training.learning_rate or lora.alpha, or check the data")
    if optim.scaler:
        optim.scaler.unscale_(optim.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.params, optim.max_grad_norm))
    # fp16's GradScaler skips steps with inf gradients by design; in bf16/fp32 an inf norm
    # means clipping zeroes (or NaNs) every gradient. DDP's norms agree on every rank.
    if optim.scaler is None and not math.isfinite(grad_norm):
        raise TrainingDiverged(
            f"non-finite gradient norm ({grad_norm}) at step {step + 1}; the adapter would be garbage. "
            "Lower training.learning_rate or lora.alpha, or check the data")
    if optim.scaler:
        optim.scaler.step(optim.optimizer)
        optim.scaler.update()
    else:
        optim.optimizer.step()
    optim.scheduler.step()
    optim.optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, tokens, grad_norm, time.time() - started)


def log_step(ctx: DistContext, optim: Optim, history: History, window: Window, step: int, grad_norm: float,
             recent: list[float]) -> None:
    """The [train] line: the mean loss over the window's steps and every rank."""
    import torch

    stats = ctx.all_reduce(torch.tensor([window.loss, window.steps, window.tokens], device=ctx.device,
                                        dtype=torch.float64))
    elapsed = max(time.time() - window.since, 1e-9)
    mean_loss = float(stats[0] / stats[1])
    history.train_loss.append([step, round(mean_loss, 6)])
    if ctx.is_main:
        train_line(step, optim.total_steps, step / optim.steps_per_epoch, mean_loss,
                   optim.scheduler.get_last_lr()[0], grad_norm, float(stats[2]) / elapsed,
                   (optim.total_steps - step) * sum(recent) / len(recent))


def evaluate(ctx: DistContext, model: Model, batches: Batches, batch_size: int) -> float | None:
    """Token-weighted mean loss over the validation rows, every rank's share summed."""
    import torch

    from entrypoint import data

    if not batches.val_rows:
        return None
    model.net.eval()
    loss_sum = torch.zeros(2, device=ctx.device)
    with torch.no_grad():
        for mb in data.batches_for_epoch(batches.val_rows, batch_size, 0, 0, ctx.rank, ctx.world):
            batch = _to(_collate(mb, batches), ctx.device)
            n = int((batch["labels"][:, 1:] != data.IGNORE).sum())
            with model.autocast:
                loss = model.net(**batch, use_cache=False, num_items_in_batch=max(n, 1)).loss
            loss_sum += torch.tensor([float(loss) * n, n], device=ctx.device)
    ctx.all_reduce(loss_sum)
    model.net.train()
    return float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else None


def checkpoint(hp: Hyperparameters, ctx: DistContext, model: Model, optim: Optim, clock: Clock, step: int,
               rng: dict, history: History, reason: str | None = None) -> float:
    """Rank 0 writes step-N (write, rename, mark COMPLETE); every rank waits for it.
    Returns the seconds it took, which the clock keeps for the MaxRuntime margin."""
    from entrypoint import checkpoints

    began = time.time()
    rngs = ctx.gather(rng)  # each rank's own: a resume replays every rank's dropout as it was
    if ctx.is_main:
        path = checkpoints.save(container.checkpoint_dir(), step, model.peft, optim.optimizer, optim.scheduler,
                                optim.scaler, rngs, {"history": asdict(history), "total_steps": optim.total_steps},
                                hp.training.save_total_limit)
        emit("checkpoint", step=step, path=path, **({"reason": reason} if reason else {}))
    ctx.barrier()
    clock.last_checkpoint = time.time()
    clock.checkpoint_s = clock.last_checkpoint - began
    return clock.checkpoint_s


def save_adapter(hp: Hyperparameters, ctx: DistContext, model: Model, batches: Batches, history: History,
                 step: int, started: float) -> None:
    """The adapter, tokenizer and card into SM_MODEL_DIR, staged so that nothing there is
    ever half-written; then the [done] line."""
    import torch

    from entrypoint import checkpoints
    from entrypoint.card import write_card

    if not ctx.is_main:
        return
    model_dir = container.model_dir()
    runtime = time.time() - started
    with checkpoints.staged(model_dir) as tmp:
        model.peft.save_pretrained(tmp)
        batches.tokenizer.save_pretrained(tmp)
        write_card(tmp, hp, batches.report, asdict(history), steps=step, runtime_s=runtime,
                   trainable=model.trainable, precision=model.precision.name)
    train_loss = history.train_loss[-1][1] if history.train_loss else float("nan")
    extra = {}
    if ctx.device.type == "cuda":
        extra["peak_gpu_mem_gib"] = f"{torch.cuda.max_memory_allocated(ctx.device) / 2**30:.2f}"
    emit("done", steps=step, train_loss=f"{train_loss:.4f}", runtime_s=f"{runtime:.0f}", adapter=model_dir, **extra)


def _collate(micro_batch: list, batches: Batches) -> dict:
    from entrypoint import data

    if batches.packing:
        return data.collate(micro_batch, batches.pad_id)
    return data.collate_padded([row[0] for row in micro_batch], batches.pad_id)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
