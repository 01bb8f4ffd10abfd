"""A look at the first rows of a local data file before launching: the columns the config
names must be there, so a typo fails here in a second and not inside a paid job.

Written by hand (standard library; pyarrow for Parquet when it is installed) because the
one library that reads all four formats, `datasets`, is a training dependency the launcher
does not have. The job reads the whole file with `datasets` and checks every row again.
"""

from __future__ import annotations

import csv
import difflib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROWS_CHECKED = 100
JSON_WHOLE_FILE_MAX = 50 * 2**20  # a .json array larger than this is left to the job


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
    if path.stat().st_size > JSON_WHOLE_FILE_MAX:
        return
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise RowError("not UTF-8 text") from None
    except json.JSONDecodeError:  # `datasets` also reads JSON Lines from a .json file
        yield from _jsonl_rows(path)
        return
    except RecursionError:
        raise RowError("nested too deeply") from None
    if not isinstance(data, list):
        raise RowError("expected a JSON array of rows (or one JSON object per line)")
    yield from enumerate(data, 1)


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            yield from enumerate(csv.DictReader(f), 2)  # row 1 is the header
    except UnicodeDecodeError:
        raise RowError("not UTF-8 text") from None
    except csv.Error as exc:
        raise RowError(f"not readable as CSV ({exc})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # the job still checks it
        return
    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise RowError(f"not readable as Parquet ({exc})") from None
    yield 1, dict.fromkeys(names, "?")  # the schema: every row has these columns


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
    """Problems in the first rows of a local data file, each naming the file and the row."""
    try:
        if not path.is_file() or path.suffix not in READERS:
            return []
    except (OSError, ValueError):  # a name the system refuses: reported as not found
        return []
    need = required_columns(spec)
    seen = 0
    try:
        for seen, (row_no, row) in enumerate(READERS[path.suffix](path), 1):
            if seen > ROWS_CHECKED:
                break
            if not isinstance(row, dict):
                return [(f"data.{field}", f"{path}: row {row_no}: expected an object, got {type(row).__name__}")]
            for key, column in need:
                if column not in row:
                    match = difflib.get_close_matches(column, [str(k) for k in row], n=1, cutoff=0.6)
                    hint = f"; did you mean {match[0]!r}?" if match else ""
                    return [(f"data.columns.{key}", f"column {column!r} is not in {path} (row {row_no} has: "
                             f"{', '.join(map(str, row)) or 'no columns'}){hint}")]
    except RowError as exc:
        return [(f"data.{field}", f"{path}: {exc}")]
    except OSError as exc:
        return [(f"data.{field}", f"{path}: cannot be read ({exc.strerror or exc})")]
    if seen == 0 and path.suffix != ".parquet":
        return [(f"data.{field}", f"{path}: no rows (the file is empty or blank)")]
    return []
