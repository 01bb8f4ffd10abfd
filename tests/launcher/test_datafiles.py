"""validate reads the whole local data file, streamed, and names the first bad row; plan counts
tokens with memory that does not grow with the file."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from launcher.config import load_config
from launcher.datafiles import _array_rows
from launcher.errors import ConfigError
from launcher.plan import count_tokens

QA = {"question": "What causes gout and how is it treated?", "answer": "Uric acid crystals in a joint; "
      "anti-inflammatories for the attack and, later, drugs that lower uric acid."}


def write_rows(path, rows: int, bad: dict[int, str] | None = None):
    line = json.dumps(QA) + "\n"
    with path.open("w") as f:
        for i in range(1, rows + 1):
            f.write(bad[i] + "\n" if bad and i in bad else line)
    return path


def config(job_dict, train, **data) -> dict:
    return job_dict | {"data": {"train": str(train), "columns": {"prompt": "question", "response": "answer"}} | data}


def problems(cfg: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    return dict(info.value.problems)


def test_invalid_json_deep_in_the_file_is_found_with_its_row(job_dict, tmp_path):
    f = write_rows(tmp_path / "d.jsonl", 6000, bad={5000: '{"question": "a", "answer": '})
    assert problems(config(job_dict, f))["data.train"] == f"{f}: row 5000: not valid JSON (Expecting value)"


@pytest.mark.parametrize("value,shown", [(7, "'7' (a number)"), (["a", "b"], "\"['a', 'b']\" (a list)"),
                                         ({"x": 1}, "\"{'x': 1}\" (an object)"), ("  ", "'  ' (text)")])
def test_a_column_that_holds_no_text_is_refused_with_its_row(job_dict, tmp_path, value, shown):
    f = write_rows(tmp_path / "d.jsonl", 300, bad={250: json.dumps({"question": "q", "answer": value})})
    assert problems(config(job_dict, f))["data.train"] == \
        f"{f}: row 250: column 'answer' must be non-empty text, got {shown}"


def test_chat_rows_are_checked_message_by_message(job_dict, tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join([json.dumps(good)] * 200 + [json.dumps({"messages": [{"role": "user", "content": 3}]})]))
    assert problems(config(job_dict, f, format="chat"))["data.train"].startswith(
        f"{f}: row 201: message 1 needs a role (system, user or assistant) and text content")


SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Fever?"},
                              {"from": "gpt", "value": "Drink fluids."}]}


def test_sharegpt_rows_pass_validate_and_plan_counts_them(job_dict, tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps(SHAREGPT) + "\n")
    cfg = load_config(config(job_dict, f, format="chat", columns={"messages": "conversations"}))
    tokens, source = count_tokens(cfg)
    assert tokens == len("Be brief. Fever? Drink fluids.") // 4 + 8 and source.startswith("estimate")


def test_a_json_array_is_read_row_by_row_across_chunks(job_dict, tmp_path):
    rows = [QA | {"answer": f"answer {i} " + "é" * (i % 7)} for i in range(500)]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    assert [r for _, r in _array_rows(f, chunk=97)] == rows
    rows[321]["answer"] = 5
    f.write_text(json.dumps(rows))
    assert problems(config(job_dict, f))["data.train"] == \
        f"{f}: row 322: column 'answer' must be non-empty text, got '5' (a number)"
    f.write_text(json.dumps(rows[:10])[:-30])
    assert "not valid JSON" in problems(config(job_dict, f))["data.train"]


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("tokenizer", [True, False], ids=["model-tokenizer", "character-estimate"])
def test_counting_and_checking_use_memory_flat_in_the_files_size(job_dict, tmp_path, tiny_model, tokenizer):
    """A file 10x the size (0.65 MB -> 6.5 MB) may not raise the Python heap's peak by more than
    half: rows are streamed and tokenized 1000 at a time (it was every row at once)."""
    peaks, counted = [], []
    for rows in (3_000, 30_000):
        f = write_rows(tmp_path / f"d{rows}.jsonl", rows)
        cfg = load_config(config(job_dict, f) | ({"model": {"id": str(tiny_model)}} if tokenizer else {}))
        peaks.append(_peak_bytes(lambda cfg=cfg: counted.append(count_tokens(cfg)[0])))
        peaks.append(_peak_bytes(lambda f=f: load_config(config(job_dict, f))))
    assert counted[1] == 10 * counted[0] > 3_000 * 20
    count_1x, check_1x, count_10x, check_10x = peaks
    assert count_10x < 1.5 * count_1x, peaks
    assert check_10x < 1.5 * check_1x, peaks


def test_every_parquet_row_is_checked_and_counted(job_dict, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from launcher.datafiles import _parquet_rows

    answers = [f"answer {i}" for i in range(2500)]
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["q?"] * 2500, "answer": answers}), f, row_group_size=700)
    assert [r["answer"] for _, r in _parquet_rows(f, batch=300)] == answers
    cfg = load_config(config(job_dict, f))
    assert count_tokens(cfg)[0] == sum(len(f"q? {a}") for a in answers) // 4 + 8 * 2500
    answers[2100] = "  "
    pq.write_table(pa.table({"question": ["q?"] * 2500, "answer": answers}), f)
    assert problems(config(job_dict, f))["data.train"] == \
        f"{f}: row 2101: column 'answer' must be non-empty text, got '  ' (text)"
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), f)
    assert problems(config(job_dict, f))["data.train"] == f"{f}: no rows (the file is empty or blank)"
