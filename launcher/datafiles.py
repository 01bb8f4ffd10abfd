"""The whole of a local data file, read row by row before launching: every row must be an
object with the columns the config names, holding what the job can train on (text, or a
list of chat messages), so a typo or a bad row fails here in seconds, naming the row, and
not inside a paid job. Rows are streamed: memory stays flat in the file's size.

Written by hand (standard library; pyarrow for Parquet when it is installed, as with `[train]`) because the
one library that reads all four formats, `datasets`, is a training dependency the launcher
does not have. What a value must hold is decided by entrypoint/data.py, which the job runs
on every row again.
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from entrypoint.data import chat_messages, text_problem

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class RowError(Exception):
    pass


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RowError(f"row {lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise RowError(f"row {lineno}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise RowError(f"row {lineno}: nested too deeply") from None


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """A JSON array of rows, decoded one row at a time; a file that does not start with `[`
    is read as JSON Lines, as `datasets` does."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        if head.startswith(b"{") and not _has_second_line(path):
            raise RowError("expected a JSON array of rows (or one JSON object per line)")
        yield from _jsonl_rows(path)
        return
    yield from _array_rows(path)


def _has_second_line(path: Path) -> bool:
    with path.open("rb") as f:
        f.readline()
        return bool(f.read(4096).strip())


def _array_rows(path: Path, chunk: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON array with at most one row and one chunk in memory: raw_decode each
    row from a buffer that is refilled when a row runs past its end."""
    decoder = json.JSONDecoder()
    row_no = 0
    with path.open(encoding="utf-8-sig") as f:
        buf, pos, eof = "", 0, False

        def refill() -> bool:
            nonlocal buf, pos, eof
            try:
                text = f.read(chunk)
            except UnicodeDecodeError:
                raise RowError(f"row {row_no + 1}: not UTF-8 text") from None
            eof = not text
            buf, pos = buf[pos:] + text, 0
            return not eof

        refill()
        pos = buf.index("[") + 1
        expect_row = True
        while True:
            while pos < len(buf) and buf[pos].isspace():
                pos += 1
            if pos >= len(buf):
                if refill():
                    continue
                raise RowError(f"row {row_no + 1}: not valid JSON (the array is not closed)")
            if buf[pos] == "]" and (row_no == 0 or not expect_row):
                return
            if not expect_row:
                if buf[pos] != ",":
                    raise RowError(f"row {row_no}: not valid JSON (expected ',' or ']' after it)")
                pos, expect_row = pos + 1, True
                continue
            try:
                row, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if not eof and refill():  # the row may go on in the next chunk
                    continue
                raise RowError(f"row {row_no + 1}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise RowError(f"row {row_no + 1}: nested too deeply") from None
            row_no += 1
            pos, expect_row = end, False
            yield row_no, row


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            yield from enumerate(csv.DictReader(f), 2)  # row 1 is the header
    except UnicodeDecodeError:
        raise RowError("not UTF-8 text") from None
    except csv.Error as exc:
        raise RowError(f"not readable as CSV ({exc})") from None


def have_pyarrow() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def _parquet_rows(path: Path, batch: int = 1000) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file, `batch` at a time; none without pyarrow (the launcher alone
    has none: the job still checks every row)."""
    if not have_pyarrow():
        return
    import pyarrow.parquet as pq

    row_no = 0
    try:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch):
            for row in record_batch.to_pylist():
                row_no += 1
                yield row_no, row
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise RowError(f"not readable as Parquet ({exc})") from None


READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def required_columns(spec) -> list[tuple[str, str]]:
    """(config field, column name) that each row needs in this data format."""
    cols = spec.columns
    if spec.format == "instruction":
        need = [("prompt", cols.prompt), ("response", cols.response)]
        return need + ([("system", cols.system)] if cols.system else [])
    if spec.format == "chat":
        return [("messages", cols.messages)]
    return [("text", cols.text)]


def column_problems(path: Path, spec, field: str) -> list[tuple[str, str]]:
    """The first problem in a local data file, naming the file and the row; [] when every
    row is usable."""
    try:
        if not path.is_file() or path.suffix not in READERS:
            return []
    except (OSError, ValueError):  # a name the system refuses: reported as not found
        return []
    need = required_columns(spec)
    seen = 0
    try:
        for row_no, row in READERS[path.suffix](path):
            seen += 1
            problem = row_problem(row, need, f"{path}: row {row_no}")
            if problem:
                return [(problem[0] or f"data.{field}", problem[1])]
    except RowError as exc:
        return [(f"data.{field}", f"{path}: {exc}")]
    except OSError as exc:
        return [(f"data.{field}", f"{path}: cannot be read ({exc.strerror or exc})")]
    if seen == 0 and (path.suffix != ".parquet" or have_pyarrow()):
        return [(f"data.{field}", f"{path}: no rows (the file is empty or blank)")]
    return []


def row_problem(row: Any, need: list[tuple[str, str]], where: str) -> tuple[str, str] | None:
    """(config field or "", what is wrong) with the row at `where` ("FILE: row N"), or None."""
    if not isinstance(row, dict):
        return "", f"{where}: expected an object, got {type(row).__name__}"
    for key, column in need:
        if column not in row:
            match = difflib.get_close_matches(column, [str(k) for k in row], n=1, cutoff=0.6)
            hint = f"; did you mean {match[0]!r}?" if match else ""
            file, _, row_no = where.rpartition(": ")
            return (f"data.columns.{key}", f"column {column!r} is not in {file} ({row_no} has: "
                    f"{', '.join(map(str, row)) or 'no columns'}){hint}")
        value = row[column]
        if key == "system" and not value:  # the job leaves a row's empty system prompt out
            continue
        problem = chat_messages(value, column)[0] if key == "messages" else text_problem(value, column)
        if problem:
            return "", f"{where}: {problem}"
    return None
