"""Formatting, response-only labels, truncation, bad rows, packing."""

from __future__ import annotations

import json

import pytest
import torch

from entrypoint import data
from entrypoint.hyperparams import DataSpec

QA = {"prompt": "question", "response": "answer"}


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labelled_text(tok, ex: data.Example) -> str:
    return tok.decode([t for t in ex.labels if t != data.IGNORE])


def test_instruction_rows_train_on_the_answer_only(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "What causes gout?", "answer": "Uric acid crystals."}])
    (ex,), report = data.load_examples(str(f), DataSpec(train=str(f), columns=QA), tok, 256)
    assert tok.decode(ex.input_ids) == "<s>[INST] What causes gout? [/INST]Uric acid crystals.</s>"
    assert labelled_text(tok, ex) == "Uric acid crystals.</s>"
    assert report.examples == 1 and report.template == "chat_template"


def test_chat_rows_train_on_every_assistant_turn(tmp_path, tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Fever?"},
            {"role": "assistant", "content": "Drink fluids."}]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])
    (ex,), _ = data.load_examples(str(f), DataSpec(train=str(f), format="chat"), tok, 256)
    assert "Be brief." in tok.decode(ex.input_ids)
    assert labelled_text(tok, ex) == "Hello.</s>Drink fluids.</s>"


def test_sharegpt_rows_train_like_the_same_conversation_in_roles(tmp_path, tok):
    """ShareGPT's from/value (human, gpt, system), as many public chat sets are written."""
    share = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Fever?"},
             {"from": "gpt", "value": "Drink fluids."}]
    roles = [{"role": {"human": "user", "gpt": "assistant", "system": "system"}[m["from"]], "content": m["value"]}
             for m in share]
    got = []
    for name, conv in (("s.jsonl", share), ("r.jsonl", roles)):
        f = write_jsonl(tmp_path / name, [{"conversations": conv}])
        spec = DataSpec(train=str(f), format="chat", columns={"messages": "conversations"})
        (ex,), _ = data.load_examples(str(f), spec, tok, 256)
        got.append((ex.input_ids, ex.labels))
    assert got[0] == got[1]
    assert labelled_text(tok, data.Example(*got[0])) == "Drink fluids.</s>"


def test_text_rows_train_on_everything(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "Gout is a kind of arthritis."}])
    (ex,), _ = data.load_examples(str(f), DataSpec(train=str(f), format="text"), tok, 256)
    assert ex.labels == ex.input_ids


def test_csv_and_parquet_load_like_jsonl(tmp_path, tok):
    import pandas as pd

    df = pd.DataFrame({"question": ["What causes gout?", "What is asthma?"], "answer": ["Uric acid.", "Airway swelling."]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        examples, report = data.load_examples(str(tmp_path / name), DataSpec(train="x", columns=QA), tok, 256)
        assert report.examples == 2 and labelled_text(tok, examples[1]) == "Airway swelling.</s>"


def test_truncation_is_counted_and_prompt_only_rows_are_dropped(tmp_path, tok):
    long_answer = " ".join(["Take rest and drink water."] * 40)
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "Short?", "answer": long_answer},
        {"question": " ".join(["Why"] * 200), "answer": "Because."},
        {"question": "What causes gout?", "answer": "Uric acid."},
    ])
    examples, report = data.load_examples(str(f), DataSpec(train=str(f), columns=QA), tok, 64)
    assert (report.truncated, report.dropped, report.examples) == (2, 1, 2)
    assert all(len(e.input_ids) <= 64 for e in examples)


@pytest.mark.parametrize("rows,spec,message", [
    ([{"question": "a", "answer": "b"}, {"question": "c", "answer": "d"}, "{not json"], {"columns": QA},
     "row 3: not valid JSON"),
    ([{"question": "a", "answer": "b"}, {"question": "c"}], {"columns": QA}, "row 2: missing column 'answer'"),
    ([{"question": "a", "answer": ""}], {"columns": QA}, "row 1: column 'answer' must be non-empty text"),
    ([{"question": "a", "answer": 42}], {"columns": QA}, "row 1: column 'answer' must be non-empty text"),
    (["[1, 2]"], {"columns": QA}, "row 1: expected a JSON object"),
    ([{"messages": [{"role": "doctor", "content": "x"}]}], {"format": "chat"}, "row 1: message 1 needs a role"),
    ([{"messages": [{"role": "user", "content": "x"}]}], {"format": "chat"}, "row 1: no assistant message"),
])
def test_a_bad_row_is_named_by_file_and_row(tmp_path, tok, rows, spec, message):
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(data.DataError) as info:
        data.load_examples(str(f), DataSpec(train=str(f), **spec), tok, 256)
    assert str(f) in str(info.value) and message in str(info.value)


def test_a_channel_directory_with_one_file_is_read(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q?", "answer": "a."}])
    examples, _ = data.load_examples(str(tmp_path), DataSpec(train="x", columns=QA), tok, 256)
    assert len(examples) == 1


def test_packing_places_every_example_once_within_the_row_length():
    examples = [data.Example(list(range(n)), list(range(n))) for n in (500, 300, 900, 100, 1000, 40, 700)]
    rows = data.pack(examples, 1024)
    assert sorted(len(e.input_ids) for r in rows for e in r) == sorted(len(e.input_ids) for e in examples)
    assert all(sum(len(e.input_ids) for e in r) <= 1024 for r in rows)
    assert len(rows) == 4  # 3540 tokens need at least 4 rows of 1024


def test_packed_rows_give_each_example_the_loss_it_has_alone(tiny_model, tok):
    """Position ids restart per example, so attention never crosses examples and the
    first token of an example is never predicted from the previous one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    rows, _ = data.load_rows(str(tiny_model.parent / "data" / "medical.jsonl"))
    examples = data.build_examples(rows.select(range(4)), DataSpec(train="x", columns=QA), tok, 256, "m",
                                   data.DataReport())
    with torch.no_grad():
        packed = data.collate([examples], pad_id=0)
        n = int((packed["labels"][:, 1:] != data.IGNORE).sum())
        packed_loss = model(**packed, num_items_in_batch=n, use_cache=False).loss
        total = 0.0
        for e in examples:
            b = data.collate_padded([e], pad_id=0)
            k = int((b["labels"][:, 1:] != data.IGNORE).sum())
            total += float(model(**b, num_items_in_batch=k).loss) * k
    assert float(packed_loss) == pytest.approx(total / n, rel=1e-5)


def test_padded_rows_of_unequal_fill_do_not_change_the_loss(tiny_model, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    rows, _ = data.load_rows(str(tiny_model.parent / "data" / "medical.jsonl"))
    ex = data.build_examples(rows.select(range(3)), DataSpec(train="x", columns=QA), tok, 256, "m", data.DataReport())
    with torch.no_grad():
        one = data.collate([[ex[0]]], pad_id=0)
        two = data.collate([[ex[0]], [ex[1], ex[2]]], pad_id=0)  # row 1 is padded to row 2's width
        loss_one = model(**one, use_cache=False).logits[0, : len(ex[0].input_ids)]
        loss_two = model(**two, use_cache=False).logits[0, : len(ex[0].input_ids)]
    torch.testing.assert_close(loss_one, loss_two, rtol=1e-4, atol=1e-4)


def test_epochs_shuffle_differently_and_ranks_get_equal_shares():
    rows = [[data.Example([i], [i])] for i in range(10)]
    e0 = data.batches_for_epoch(rows, 2, seed=1, epoch=0)
    assert e0 == data.batches_for_epoch(rows, 2, seed=1, epoch=0)
    assert e0 != data.batches_for_epoch(rows, 2, seed=1, epoch=1)
    r0 = data.batches_for_epoch(rows, 1, seed=1, epoch=0, rank=0, world=3)
    r1 = data.batches_for_epoch(rows, 1, seed=1, epoch=0, rank=1, world=3)
    assert len(r0) == len(r1) == 3
    assert not {id(b[0]) for b in r0} & {id(b[0]) for b in r1}


@pytest.mark.parametrize("content,message", [
    (b"", "no rows: the file is empty"),
    (b"\n\n  \n", "no rows: the file holds only blank lines"),
    (b'{"question": "a?", "answer": "b."}\n{"question": "c?", "answer": 42}\n',
     "row 2: column 'answer' is a number, but text in row 1"),
    (b'{"question": "a?", "answer": "b."}\n{"question": "caf\xe9?", "answer": "d."}\n', "row 2: not UTF-8 text"),
])
def test_a_broken_file_is_named_as_the_user_wrote_it_with_its_row(tmp_path, tok, content, message):
    """The job reads a copy in its input channel; the error names `data.train` instead."""
    channel = tmp_path / "input" / "data" / "train"
    channel.mkdir(parents=True)
    (channel / "visits.jsonl").write_bytes(content)
    user_path = "s3://my-bucket/clinic/visits.jsonl"
    with pytest.raises(data.DataError) as info:
        data.load_examples(str(channel), DataSpec(train=user_path, columns=QA), tok, 256, shown_as=user_path)
    assert str(info.value).startswith(f"{user_path}: ") and message in str(info.value)
    assert str(channel) not in str(info.value)


def test_a_file_in_a_multi_file_channel_is_named_under_the_users_prefix(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [{"question": "q?", "answer": "a."}])
    (tmp_path / "b.jsonl").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"^s3://b/prefix/b\.jsonl: no rows: the file is empty"):
        data.load_examples(str(tmp_path), DataSpec(train="x", columns=QA), tok, 256, shown_as="s3://b/prefix/")


def test_an_empty_csv_is_named_too(tmp_path, tok):
    (tmp_path / "d.csv").write_text("")
    with pytest.raises(data.DataError, match=r"^my/d\.csv: no rows"):
        data.load_examples(str(tmp_path / "d.csv"), DataSpec(train="x", columns=QA), tok, 256, shown_as="my/d.csv")
