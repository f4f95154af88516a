"""Data: every input format, bad rows with row numbers, prompt masking, truncation stats, split."""

import json

import pandas as pd
import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from jobs.config import DataConfig
from jobs.data import DataError, encode, load_examples
from jobs.data.driver import prepare
from jobs.prompting import Prompting

ROWS = [{"id": f"r{i}", "input": f"Day: Monday, Score: {i}", "output": f"output {i}"} for i in range(10)]


def _cfg(path, **kw):
    return DataConfig(path=str(path), **kw)


def test_jsonl_csv_parquet_and_hf_folder_read_the_same_rows(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS))
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    pd.DataFrame(ROWS).to_parquet(tmp_path / "files" / "train.parquet")
    paths = [jsonl, tmp_path / "d.csv", tmp_path / "d.parquet", tmp_path / "saved", tmp_path / "files"]
    results = [load_examples(_cfg(p))[0] for p in paths]
    expected = [(f"Day: Monday, Score: {i}", f"output {i}") for i in range(10)]
    for got in results:
        assert [(e["prompt"], e["target"]) for e in got] == expected


def test_squad_keeps_every_reference_answer(tmp_path):
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "Paris is the capital of France.", "qas": [
        {"id": "q1", "question": "What is the capital?", "answers": [{"text": "Paris", "answer_start": 0}, {"text": "Paris", "answer_start": 0}, {"text": "capital of France", "answer_start": 13}]}]}]}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    examples, report = load_examples(_cfg(path))
    assert report["format"] == "squad" and len(examples) == 1
    assert examples[0]["references"] == ["Paris", "Paris", "capital of France"]
    assert examples[0]["target"] == "Paris"
    assert "Context: Paris is the capital of France." in examples[0]["prompt"] and "Question: What is the capital?" in examples[0]["prompt"]


def test_real_squad_subset(squad_file):
    examples, report = load_examples(_cfg(squad_file))
    assert report["rows_read"] == 269 and report["bad_rows"] == 0 and len(examples) == 269
    assert all(e["target"] in e["prompt"] for e in examples), "SQuAD answers are spans of their context"


def test_squad_answer_not_in_context_is_reported_with_row(tmp_path):
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "abc", "qas": [
        {"id": "ok", "question": "q", "answers": [{"text": "abc", "answer_start": 0}]},
        {"id": "bad", "question": "q", "answers": [{"text": "xyz", "answer_start": 0}]}]}]}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"row 2: answers: question 'bad': answer 'xyz' is not in the context"):
        load_examples(_cfg(path))


def test_bad_rows_fail_with_row_numbers_by_default(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in ROWS[:3]] + ['{"input": "x", "output": ""}', "{not json", json.dumps({"input": "y"}), "[1, 2]"]
    path.write_text("\n".join(lines))
    with pytest.raises(DataError) as err:
        load_examples(_cfg(path))
    text = str(err.value)
    assert "4 problem(s) in 7 row(s)" in text
    assert "row 4: output: missing or empty" in text
    assert "row 5: (line): not valid JSON" in text
    assert "row 6: output: missing or empty" in text
    assert "row 7: (line): a JSON list, expected an object" in text
    assert "data.bad_rows=skip" in text


def test_skipped_bad_rows_are_counted_not_hidden(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([json.dumps(r).encode() for r in ROWS[:3]] + [b'{"input": "\xff\xfe", "output": "o"}']))
    examples, report = load_examples(_cfg(path, bad_rows="skip"))
    assert len(examples) == 3
    assert report["rows_read"] == 4 and report["bad_rows"] == 1
    assert "row 4: (line): not UTF-8" in report["bad_row_details"][0]


def test_missing_column_names_the_columns_and_the_fix(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame([{"question": "q", "answer": "a"}]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"column\(s\) \['input', 'output'\].*its columns are \['answer', 'question'\].*data.columns"):
        load_examples(_cfg(path))
    examples, _ = load_examples(_cfg(path, columns={"question": "input", "answer": "output"}))
    assert examples[0]["prompt"] == "q" and examples[0]["target"] == "a"


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        load_examples(_cfg(tmp_path / "e.jsonl"))
    with pytest.raises(DataError, match="file not found"):
        load_examples(_cfg(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="cannot tell the format"):
        load_examples(_cfg(tmp_path / "d.txt"))


def test_causal_masks_the_prompt_and_ends_with_eos(tiny_causal):
    tok = AutoTokenizer.from_pretrained(tiny_causal)
    cfg = DataConfig()
    out = encode({"prompt": "Day: Monday", "target": "output first"}, Prompting(tok, "causal", True), cfg)
    prompt_ids = tok(Prompting(tok, "causal", True).text("Day: Monday", None), add_special_tokens=False)["input_ids"]
    target_ids = tok("output first", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out["input_ids"] == prompt_ids + target_ids
    assert out["labels"] == [-100] * len(prompt_ids) + target_ids
    assert tok.decode(prompt_ids).startswith("<|im_start|> user")


def test_seq2seq_puts_target_in_labels(tiny_seq2seq):
    tok = AutoTokenizer.from_pretrained(tiny_seq2seq)
    out = encode({"prompt": "Day: Monday", "target": "output first"}, Prompting(tok, "seq2seq", False), DataConfig())
    assert out["input_ids"] == tok("Day: Monday")["input_ids"]
    assert out["labels"] == tok(text_target="output first")["input_ids"]
    assert out["labels"][-1] == tok.eos_token_id and -100 not in out["labels"]


def test_truncation_is_counted_and_split_is_seeded(tiny_causal):
    tok = AutoTokenizer.from_pretrained(tiny_causal)
    cfg = DataConfig(path="demo", demo_rows=50, max_source_length=8, validation_fraction=0.2)
    first = prepare(cfg, Prompting(tok, "causal", False))
    again = prepare(cfg, Prompting(tok, "causal", False))
    assert first.report["train"]["truncated_share"] == 1.0
    assert first.report["train"]["rows"] == 40 and first.report["validation"]["rows"] == 10
    assert [e["id"] for e in first.eval_examples] == [e["id"] for e in again.eval_examples]
    assert all(len([t for t in row if t != -100]) <= cfg.max_target_length for row in first.train["labels"])
