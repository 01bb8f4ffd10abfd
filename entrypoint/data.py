"""Training data: load (JSONL, CSV, Parquet, or an hf:// dataset), format with the
tokenizer's chat template, label the response tokens only, and pack.

Packing: examples are placed whole into rows of at most `max_seq_length` tokens (first
fit, longest first) and each example's position ids restart at 0. With no attention
mask, transformers (>= 4.54) reads the restarts as sequence boundaries and masks
attention block-diagonally (SDPA) or runs FlashAttention-2 varlen, so no token attends
across examples and no compute is spent on padding. The first label of each example is
masked so the end of one example never predicts the start of the next.
Written by hand because no library packs with this boundary handling for a plain
PyTorch loop (transformers' DataCollatorWithFlattening flattens a batch, not a corpus).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

IGNORE = -100
SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FALLBACK_TEMPLATE = "### Question:\n{prompt}\n\n### Answer:\n"


class DataError(ValueError):
    pass


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataReport:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    label_tokens: int = 0
    template: str = "chat_template"
    sources: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- loading

def find_data_file(location: str) -> Path:
    """A file, or a channel directory holding exactly one data file."""
    path = Path(location)
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if len(files) == 1:
            return files[0]
        if not files:
            raise DataError(f"{path}: no .jsonl, .json, .csv or .parquet file in this directory")
        return path  # several files: load them all as one split
    raise DataError(f"{location}: no such file or directory")


JSON_TYPES = {str: "text", int: "a number", float: "a number", bool: "true/false", list: "a list",
              dict: "an object"}


def _check_jsonl(path: Path, name: str) -> None:
    """datasets reports a bad line, a type clash between rows or a non-UTF-8 byte without
    the row; find them first, and name the file as the user wrote it."""
    seen: dict[str, tuple[str, int]] = {}  # column -> (JSON type, first row with it)
    rows = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{name}: row {lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} "
                                f"at column {exc.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{name}: row {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{name}: row {lineno}: expected a JSON object, got {type(row).__name__}")
            _check_types(row, seen, name, lineno)
    if rows == 0:
        raise DataError(f"{name}: no rows: the file is empty" if path.stat().st_size == 0
                        else f"{name}: no rows: the file holds only blank lines")


def _check_types(row: dict, seen: dict[str, tuple[str, int]], name: str, lineno: int) -> None:
    for column, value in row.items():
        if value is None:
            continue
        kind = JSON_TYPES.get(type(value), type(value).__name__)
        first = seen.setdefault(column, (kind, lineno))
        if first[0] != kind and {first[0], kind} != {"a number"}:
            raise DataError(f"{name}: row {lineno}: column {column!r} is {kind}, but {first[0]} in row {first[1]}; "
                            "every row must give a column the same type")


def shown_name(file: Path, location: str, shown_as: str | None) -> str:
    """How errors name a data file: as the user wrote it (`data.train`), not as the copy
    in the job's input channel. A file inside a channel directory is named under it."""
    if not shown_as:
        return str(file)
    root = Path(location)
    if root.is_file() or Path(shown_as).name == file.name:
        return shown_as
    rel = file.relative_to(root) if root.is_dir() and file.is_relative_to(root) else Path(file.name)
    return f"{shown_as.rstrip('/')}/{rel.as_posix()}"


def load_rows(location: str, token: str | None = None, shown_as: str | None = None):
    """-> (datasets.Dataset, name used in error messages)."""
    import datasets

    datasets.disable_progress_bars()
    if location.startswith("hf://"):
        spec = location[len("hf://"):]
        name, _, split = spec.partition(":")
        return datasets.load_dataset(name, split=split or "train", token=token), location
    path = find_data_file(location)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
    shown = shown_name(path, location, shown_as) if path.is_file() else (shown_as or location)
    kinds = {SUFFIXES.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{shown}: data files must all be .jsonl/.json, .csv or .parquet")
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"{shown_name(p, location, shown_as)}: no rows: the file is empty")
        if p.suffix == ".jsonl":
            _check_jsonl(p, shown_name(p, location, shown_as))
    try:
        ds = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    except Exception as exc:  # arrow type clashes in .json/.csv, unreadable parquet, ...
        raise DataError(f"{shown}: could not be read as a table: {type(exc).__name__}: {exc}") from None
    if len(ds) == 0:
        raise DataError(f"{shown}: no rows")
    return ds, shown


# --------------------------------------------------------------------------- formatting

def _text(row: dict, column: str, source: str, index: int) -> str:
    if row.get(column) is None:  # datasets fills a key missing from one JSONL row with None
        raise DataError(f"{source}: row {index + 1}: missing column {column!r} (columns: {', '.join(row)})")
    problem = text_problem(row[column], column)
    if problem:
        raise DataError(f"{source}: row {index + 1}: {problem}")
    return row[column]


def text_problem(value, column: str) -> str | None:
    """Why a prompt, response or text value is not usable (the launcher's validate asks too)."""
    if not isinstance(value, str) or not value.strip():
        return f"column {column!r} must be non-empty text, got {str(value)[:60]!r} ({_kind(value)})"
    return None


def _messages(row: dict, spec, source: str, index: int) -> list[dict]:
    cols = spec.columns
    if spec.format == "instruction":
        msgs = []
        system = row.get(cols.system) if cols.system else spec.system_prompt
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": _text(row, cols.prompt, source, index)})
        msgs.append({"role": "assistant", "content": _text(row, cols.response, source, index)})
        return msgs
    problem, msgs = chat_messages(row.get(cols.messages), cols.messages)
    if problem:
        raise DataError(f"{source}: row {index + 1}: {problem}")
    return msgs


# ShareGPT rows ({"from": "human", "value": "..."}), as many public chat datasets are written.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES = ("system", "user", "assistant")


def chat_message(m) -> dict | None:
    """One message as {role, content}: OpenAI style as it is, ShareGPT's from/value mapped;
    None when it is neither. `datasets` gives every message all the keys any row used (the
    others None), so the style is told by which keys hold a value."""
    if not isinstance(m, dict):
        return None
    if m.get("role") is not None:
        role, content = m["role"], m.get("content")
    else:
        role, content = SHAREGPT_ROLES.get(m.get("from")), m.get("value")
    if role not in ROLES or not isinstance(content, str):
        return None
    return {"role": role, "content": content}


def chat_messages(value, column: str) -> tuple[str | None, list[dict]]:
    """(why the column's value is not a conversation, or None; its messages as {role, content}).
    The launcher's validate calls this too, so both sides accept the same rows."""
    if not isinstance(value, list) or not value:
        return f"column {column!r} must be a list of messages, got {_kind(value)}", []
    msgs = []
    for j, m in enumerate(value):
        msg = chat_message(m)
        if msg is None:
            return (f"message {j + 1} needs a role (system, user or assistant) and text content, "
                    "or ShareGPT's from (human, gpt, system) and value"), []
        msgs.append(msg)
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message to learn from", []
    return None, msgs


def _kind(value) -> str:
    return "nothing" if value is None else JSON_TYPES.get(type(value), type(value).__name__)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # Base models without a template: a plain question/answer layout.
    text = ""
    for m in messages:
        if m["role"] in ("system", "user"):
            text += FALLBACK_TEMPLATE.format(prompt=m["content"]) if m["role"] == "user" else m["content"] + "\n\n"
        else:
            text += m["content"] + (tokenizer.eos_token or "")
    return (tokenizer.bos_token or "") + text


def response_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns."""
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(before):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "use data.format: text")
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize(tokenizer, text: str, spans: list[tuple[int, int]] | None) -> Example:
    """Labels are the token ids inside `spans` (None: every token), IGNORE elsewhere."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
    ids = enc["input_ids"]
    if spans is None:
        return Example(ids, list(ids))
    labels = [tid if any(s <= start < e for s, e in spans) else IGNORE
              for tid, (start, _) in zip(ids, enc["offset_mapping"], strict=True)]
    return Example(ids, labels)


def build_examples(rows, spec, tokenizer, max_len: int, source: str, report: DataReport) -> list[Example]:
    examples = []
    for i, row in enumerate(rows):
        if spec.format == "text":
            ex = tokenize(tokenizer, (tokenizer.bos_token or "") + _text(row, spec.columns.text, source, i)
                          + (tokenizer.eos_token or ""), None)
        else:
            messages = _messages(row, spec, source, i)
            try:
                text, spans = response_spans(tokenizer, messages)
            except DataError as exc:
                raise DataError(f"{source}: row {i + 1}: {exc}") from None
            ex = tokenize(tokenizer, text, spans)
        if len(ex.input_ids) > max_len:
            report.truncated += 1
            ex = Example(ex.input_ids[:max_len], ex.labels[:max_len])
        if all(label == IGNORE for label in ex.labels[1:]):
            report.dropped += 1  # the prompt alone fills max_seq_length: nothing to learn
            continue
        report.examples += 1
        report.tokens += len(ex.input_ids)
        report.label_tokens += sum(label != IGNORE for label in ex.labels[1:])
        examples.append(ex)
    report.template = "chat_template" if tokenizer.chat_template else "fallback (### Question / ### Answer)"
    report.sources.append(source)
    return examples


def load_examples(location: str, spec, tokenizer, max_len: int, token: str | None = None,
                  shown_as: str | None = None):
    """`shown_as`: the user's own name for the data (`data.train`), used in every error."""
    rows, source = load_rows(location, token, shown_as)
    report = DataReport()
    return build_examples(rows, spec, tokenizer, max_len, source, report), report


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(examples) * fraction))
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


# --------------------------------------------------------------------------- packing and batches

def pack(examples: list[Example], max_len: int) -> list[list[Example]]:
    """First-fit decreasing into rows of at most max_len tokens. Deterministic."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[Example]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(examples[i])
                free[r] -= n
                break
        else:
            rows.append([examples[i]])
            free.append(max_len - n)
    return rows


def collate(rows: list[list[Example]], pad_id: int) -> dict:
    """Rows of packed examples -> input_ids, labels, position_ids (no attention mask).
    Shorter rows are filled with a pad run whose positions restart at 0, so it is a
    sequence of its own that nothing attends to, and its labels are ignored."""
    import torch

    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids, labels, pos = [], [], []
    for row in rows:
        r_ids, r_lab, r_pos = [], [], []
        for e in row:
            r_ids += e.input_ids
            r_lab += [IGNORE] + e.labels[1:]
            r_pos += list(range(len(e.input_ids)))
        fill = width - len(r_ids)
        r_ids += [pad_id] * fill
        r_lab += [IGNORE] * fill
        r_pos += list(range(fill))
        ids.append(r_ids)
        labels.append(r_lab)
        pos.append(r_pos)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}


def collate_padded(examples: list[Example], pad_id: int) -> dict:
    """Unpacked: one example per row, right-padded to the longest, with an attention mask."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    labels = [[IGNORE] + e.labels[1:] + [IGNORE] * (width - len(e.labels)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def units(examples: list[Example], max_len: int, packing: bool) -> list:
    """What a batch row is made of: a packed row (list of examples) or one example."""
    return pack(examples, max_len) if packing else [[e] for e in examples]


def batches_for_epoch(rows: list, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list]:
    """This rank's micro-batches for one epoch: rows shuffled by (seed, epoch), dealt out
    round-robin so every rank gets the same count (the last few rows may be dropped)."""
    order = list(range(len(rows)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    usable = len(order) - len(order) % world
    mine = [rows[i] for i in order[:usable][rank::world]]
    return [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]
