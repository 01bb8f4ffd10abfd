"""The QLoRA training job, top to bottom: read the hyperparameters SageMaker hands the
container, load the data, load the base model in 4-bit, attach LoRA, train with
checkpoints, save the adapter to SM_MODEL_DIR.

Runs as `python -m entrypoint` (local runner), as the Estimator's entry script, or under
torchrun (one process per GPU, rank 0 alone writes). Progress goes to stdout as the
SPEC's `[train] step=...` lines, which CloudWatch, the metric regexes and `sm-qlora
logs` all read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from entrypoint.hyperparams import Hyperparameters, unflatten
from entrypoint.progress import emit, fail, train_line

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 143  # 128 + SIGTERM: checkpointed and stopped; resume continues from here


# --------------------------------------------------------------------------- the container contract

def read_hyperparameters() -> Hyperparameters:
    """/opt/ml/input/config/hyperparameters.json (values JSON-encoded by the Estimator),
    else SM_HPS (decoded); validated by the launcher's own model."""
    from pydantic import ValidationError

    config_dir = Path(os.environ.get("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config"))
    path = config_dir / "hyperparameters.json"
    if path.is_file():
        raw = unflatten(json.loads(path.read_text()), encoded=True)
    elif "SM_HPS" in os.environ:
        raw = unflatten(json.loads(os.environ["SM_HPS"]), encoded=False)
    else:
        raise BadInput(f"no hyperparameters: {path} is missing and SM_HPS is not set")
    try:
        return Hyperparameters.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise BadInput(f"invalid hyperparameters: {problems}") from None


class BadInput(Exception):
    """The job cannot start with what it was given: fail at once, one line in the log."""


def channel(name: str) -> str | None:
    path = os.environ.get(f"SM_CHANNEL_{name.upper()}")
    return path if path and Path(path).exists() and any(Path(path).iterdir()) else None


def hf_token() -> str | None:
    """HF_TOKEN, a variable the user named (local runs), or a Secrets Manager secret whose
    ARN the launcher passed. The token is never printed or written."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    named = os.environ.get("SM_QLORA_HF_TOKEN_ENV")
    if named:
        if not os.environ.get(named):
            raise BadInput(f"aws.hf_token_env names {named}, which is not set")
        return os.environ[named]
    arn = os.environ.get("SM_QLORA_HF_TOKEN_SECRET")
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


# --------------------------------------------------------------------------- the job

def main() -> None:
    from entrypoint.checkpoints import Interrupt

    interrupt = Interrupt()  # first: a stop during model loading must not be lost
    started = time.time()
    try:
        code = run(interrupt, started)
    except BadInput as exc:
        _failure(str(exc))
        code = EXIT_BAD_INPUT
    except Exception as exc:
        from entrypoint.data import DataError
        from entrypoint.model import QuantizationError

        if not isinstance(exc, (DataError, QuantizationError)):
            raise
        _failure(str(exc))
        code = EXIT_BAD_INPUT
    sys.exit(code)


def _failure(reason: str) -> None:
    """One line in the log, and /opt/ml/output/failure, which SageMaker shows as FailureReason."""
    fail(reason)
    out = Path(os.environ.get("SM_OUTPUT_DIR", "/opt/ml/output"))
    with contextlib.suppress(OSError):
        out.mkdir(parents=True, exist_ok=True)
        (out / "failure").write_text(reason[:1000])


def _quiet_progress_bars() -> None:
    """tqdm bars write carriage returns into CloudWatch; the SPEC's lines are the progress."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run(interrupt, started: float) -> int:
    _quiet_progress_bars()
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, get_scheduler, set_seed

    from entrypoint import checkpoints, data
    from entrypoint import model as models

    hp = read_hyperparameters()
    t = hp.training

    # ---- processes and devices: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    main_proc = rank == 0
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    strategy = hp.strategy if hp.strategy != "auto" else ("ddp" if world > 1 else "single")
    if strategy == "model_parallel" and torch.cuda.device_count() > 1 and world == 1:
        device_map = "auto"
    else:
        device_map = {"": device.index if device.type == "cuda" else "cpu"}
    precision = models.choose_precision(device)
    attn = models.attention_implementation(device)
    say = emit if main_proc else (lambda *a, **k: None)
    say("info", job=os.environ.get("SM_QLORA_JOB_NAME", os.environ.get("TRAINING_JOB_NAME", "local")),
        world=world, strategy=strategy, device=device.type, gpus=torch.cuda.device_count(),
        hosts=len(json.loads(os.environ.get("SM_HOSTS", '["algo-1"]'))))
    say("model", precision=precision.name, reason=precision.reason, attention=attn)
    set_seed(t.seed)

    # ---- data
    token = hf_token()
    source = channel("model") or hp.model.id
    tokenizer = AutoTokenizer.from_pretrained(source, token=token, revision=hp.model.revision,
                                              trust_remote_code=hp.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train_examples, report = data.load_examples(channel("train") or hp.data.train, hp.data, tokenizer,
                                                t.max_seq_length, token)
    if hp.data.validation or channel("validation"):
        val_examples, _ = data.load_examples(channel("validation") or hp.data.validation, hp.data, tokenizer,
                                             t.max_seq_length, token)
    else:
        train_examples, val_examples = data.split_validation(train_examples, hp.data.validation_split, t.seed)
    if not train_examples:
        raise BadInput("no training examples left after truncation")
    rows = data.units(train_examples, t.max_seq_length, t.packing)
    val_rows = data.units(val_examples, t.max_seq_length, t.packing)
    row_tokens = sum(len(e.input_ids) for r in rows for e in r)
    say("data", examples=report.examples, train=len(train_examples), validation=len(val_examples),
        truncated=report.truncated, dropped=report.dropped, tokens=report.tokens, label_tokens=report.label_tokens,
        rows=len(rows), fill=f"{row_tokens / (len(rows) * t.max_seq_length):.2f}" if t.packing else "n/a",
        packing=t.packing, template=report.template.split(" ")[0])

    # ---- model: 4-bit base, checked, then LoRA
    base = models.load_4bit(source, precision, device_map, attn, token=token, revision=hp.model.revision,
                            trust_remote_code=hp.model.trust_remote_code)
    quant = models.check_quantized(base)
    net = models.attach_lora(base, hp.lora, t.gradient_checkpointing)
    trainable, total = models.parameter_counts(net)
    say("model", linear4bit=quant["linear4bit"], trainable=trainable, total=total,
        trainable_pct=f"{100 * trainable / total:.3f}", targets=",".join(net.peft_config["default"].target_modules))
    if world > 1:
        # find_unused_parameters: an expert that no token was routed to gets no gradient.
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[local_rank] if device.type == "cuda" else None, find_unused_parameters=True)
    peft_model = net.module if world > 1 else net

    # ---- optimizer and schedule
    params = [p for p in net.parameters() if p.requires_grad]
    kind = t.optimizer if t.optimizer != "auto" else ("adamw_8bit" if device.type == "cuda" else "adamw_torch")
    if kind in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if kind == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        optimizer = cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    micro_per_epoch = math.ceil((len(rows) // world) / t.per_device_batch_size)
    if micro_per_epoch == 0:
        raise BadInput(f"{len(rows)} training rows cannot feed {world} processes")
    steps_per_epoch = math.ceil(micro_per_epoch / t.gradient_accumulation_steps)
    total_steps = t.max_steps or steps_per_epoch * t.epochs
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if precision.name == "fp16" else None
    autocast = (torch.autocast("cuda", dtype=precision.dtype) if device.type == "cuda"
                else contextlib.nullcontext())

    # ---- resume from the newest complete checkpoint, if any
    ckpt_root = Path(os.environ.get("SM_QLORA_CHECKPOINT_DIR", "/opt/ml/checkpoints"))
    step, history = 0, {"train_loss": [], "eval_loss": []}
    newest = checkpoints.latest(ckpt_root)
    if newest is not None:
        state = checkpoints.load(newest, peft_model, optimizer, scheduler, scaler)
        step, history = state["step"], state.get("history", history)
        say("resume", step=step, path=newest)
    eval_every = t.eval_steps or (t.save_steps if val_rows else None)

    def evaluate() -> float | None:
        if not val_rows:
            return None
        net.eval()
        loss_sum = torch.zeros(2, device=device)
        with torch.no_grad():
            for mb in data.batches_for_epoch(val_rows, t.per_device_batch_size, 0, 0, rank, world):
                batch = _to(_collate(data, mb, pad_id, t.packing), device)
                n = int((batch["labels"][:, 1:] != data.IGNORE).sum())
                with autocast:
                    loss = net(**batch, use_cache=False, num_items_in_batch=max(n, 1)).loss
                loss_sum += torch.tensor([float(loss) * n, n], device=device)
        if world > 1:
            dist.all_reduce(loss_sum)
        net.train()
        return float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else None

    def save_checkpoint(at_step: int, rng: dict) -> None:
        if main_proc:
            path = checkpoints.save(ckpt_root, at_step, peft_model, optimizer, scheduler, scaler, rng,
                                    {"history": history, "total_steps": total_steps}, t.save_total_limit)
            emit("checkpoint", step=at_step, path=path)
        if world > 1:
            dist.barrier()

    def stop_requested() -> bool:
        if world == 1:
            return bool(interrupt)
        flag = torch.tensor([1.0 if interrupt else 0.0], device=device)
        dist.all_reduce(flag)
        return flag.item() > 0

    # ---- train
    net.train()
    window = {"loss": 0.0, "tokens": 0, "steps": 0, "since": time.time()}
    step_times: list[float] = []
    grad_norm = torch.tensor(0.0)
    while step < total_steps:
        epoch = step // steps_per_epoch
        micro = data.batches_for_epoch(rows, t.per_device_batch_size, t.seed, epoch, rank, world)
        groups = [micro[i: i + t.gradient_accumulation_steps]
                  for i in range(0, len(micro), t.gradient_accumulation_steps)]
        for group in groups[step % steps_per_epoch:]:
            if step >= total_steps:
                break
            rng_at_start = checkpoints.rng_state()  # a checkpoint of this step replays from here
            step_start = time.time()
            batches = [_to(_collate(data, mb, pad_id, t.packing), device) for mb in group]
            n_items = sum(int((b["labels"][:, 1:] != data.IGNORE).sum()) for b in batches)
            # tokens_per_sec counts tokens of data, not padding
            window["tokens"] += sum(len(e.input_ids) for mb in group for row in mb for e in row)
            step_loss = 0.0
            for j, batch in enumerate(batches):
                sync = world == 1 or j == len(batches) - 1
                with (contextlib.nullcontext() if sync else net.no_sync()), autocast:
                    # num_items_in_batch: the loss is summed over tokens and divided by the
                    # step's label count, so packed rows of unequal fill weigh each token alike.
                    loss = net(**batch, use_cache=False, num_items_in_batch=max(n_items, 1)).loss
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss.detach().item()
                if stop_requested():
                    return _stop(save_checkpoint, step, rng_at_start, say, interrupt)
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_times.append(time.time() - step_start)
            window["loss"] += step_loss
            window["steps"] += 1

            if step % t.logging_steps == 0 or step == total_steps:
                stats = torch.tensor([window["loss"], window["steps"], window["tokens"]], device=device,
                                     dtype=torch.float64)
                if world > 1:
                    dist.all_reduce(stats)
                elapsed = max(time.time() - window["since"], 1e-9)
                mean_loss = float(stats[0] / stats[1])
                recent = step_times[-20:]
                history["train_loss"].append([step, round(mean_loss, 6)])
                if main_proc:
                    train_line(step, total_steps, step / steps_per_epoch, mean_loss, scheduler.get_last_lr()[0],
                               float(grad_norm), float(stats[2]) / elapsed,
                               (total_steps - step) * sum(recent) / len(recent))
                window = {"loss": 0.0, "tokens": 0, "steps": 0, "since": time.time()}
            if eval_every and (step % eval_every == 0 or step == total_steps):
                eval_loss = evaluate()
                if eval_loss is not None:
                    history["eval_loss"].append([step, round(eval_loss, 6)])
                    say("eval", step=f"{step}/{total_steps}", eval_loss=f"{eval_loss:.4f}")
            if step % t.save_steps == 0 and step < total_steps:
                save_checkpoint(step, checkpoints.rng_state())
            if stop_requested():
                return _stop(save_checkpoint, step, checkpoints.rng_state(), say, interrupt)

    # ---- save the adapter
    model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    train_loss = history["train_loss"][-1][1] if history["train_loss"] else float("nan")
    runtime = time.time() - started
    if main_proc:
        from entrypoint.card import write_card

        model_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        write_card(model_dir, hp, report, history, steps=step, runtime_s=runtime,
                   trainable=trainable, precision=precision.name)
        extra = {}
        if device.type == "cuda":
            extra["peak_gpu_mem_gib"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"
        emit("done", steps=step, train_loss=f"{train_loss:.4f}", runtime_s=f"{runtime:.0f}", adapter=model_dir,
             **extra)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _collate(data, micro_batch, pad_id: int, packing: bool) -> dict:
    if packing:
        return data.collate(micro_batch, pad_id)
    return data.collate_padded([row[0] for row in micro_batch], pad_id)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _stop(save_checkpoint, step: int, rng: dict, say, interrupt) -> int:
    save_checkpoint(step, rng)
    say("stopped", step=step, reason=f"signal_{interrupt.signum}")
    return EXIT_STOPPED
