"""The corpus of broken inputs (tests/corpus/): every file is refused by the training job's real
entry point, with file, row and field named, before Ray starts and before anything is written."""

from pathlib import Path

import pytest
import ray

from jobs.config import ConfigError, load_config
from jobs.data import DataError
from jobs.train import train

CORPUS = Path(__file__).resolve().parent / "corpus"

BROKEN_DATA = {  # file -> what the error must say
    "empty.jsonl": ["empty.jsonl", "the file is empty"],
    "blank-lines.jsonl": ["blank-lines.jsonl", "no rows found"],
    "wrong-columns.jsonl": ["wrong-columns.jsonl", "['input', 'output']", "its columns are ['answer', 'question']", "data.columns"],
    "latin1-bytes.jsonl": ["latin1-bytes.jsonl", "row 2: (line): not UTF-8"],
    "missing-fields.jsonl": ["missing-fields.jsonl", "4 problem(s)", "row 2: input: missing or empty", "row 3: output: missing or empty",
                             "row 4: output: missing or empty", "row 5: output: missing or empty"],
    "empty-cell.csv": ["empty-cell.csv", "row 2: input: missing or empty"],
    "broken-json-line.jsonl": ["broken-json-line.jsonl", "row 2: (line): not valid JSON"],
    "not-objects.jsonl": ["not-objects.jsonl", "row 1: (line): a JSON list, expected an object"],
    "wrong-types.jsonl": ["wrong-types.jsonl", "row 1: output: a list, expected text"],
    "squad-answer-not-in-context.json": ["squad-answer-not-in-context.json", "row 2: answers: question 'q2': answer 'the dog' is not in the context"],
    "squad-no-answers.json": ["squad-no-answers.json", "row 1: answers: question 'q1' has no answer text"],
    "squad-not-squad.json": ["squad-not-squad.json", "not a SQuAD v1.1 JSON file"],
    "bad-conversations.jsonl": ["bad-conversations.jsonl", "7 problem(s) in 8 row(s)", "row 2: turn 2: unknown role 'bot'",
                                "row 3: turn 1: user content: empty", "row 5: messages: no assistant turn to learn from"],
}

BROKEN_CONFIGS = {
    "typos.yaml": ["3 problem(s)", "trainig = {'max_steps': 10}: unknown key; did you mean 'training'?", "lora.target_module = 'all-linear': unknown key; did you mean 'target_modules'?",
                   "lora.rank = 8: unknown key; known keys here: r, alpha"],
    "wrong-types.yaml": ["6 problem(s)", "training.learning_rate = 'fast'", "training.max_steps = 'ten'", "training.batch_size = 0", "lora.r = -4",
                         "lora.dropout = 1.5", "quantization.mode = '3bit'"],
    "conflicting.yaml": ["5 problem(s)", "ZeRO-3 cannot shard 4bit", "remove model.device_map", "fp16 mixed precision needs a GPU",
                         "serve.min_replicas = 3: above serve.max_replicas (1)", "serve.default_max_tokens = 512: above serve.max_tokens_limit (64)"],
    "not-a-mapping.yaml": ["the file must be a YAML mapping of sections"],
    "broken-yaml.yaml": ["broken-yaml.yaml", "not valid YAML", "line 1, column 8"],
    "tabs.yaml": ["tabs.yaml", "not valid YAML", "found character '\\t'", "line 3"],
}


def test_the_corpus_is_complete():
    assert {p.name for p in (CORPUS / "data").iterdir()} == set(BROKEN_DATA)
    assert {p.name for p in (CORPUS / "configs").iterdir()} == set(BROKEN_CONFIGS)


@pytest.mark.parametrize("name", sorted(BROKEN_DATA))
def test_broken_data_is_refused_before_ray_starts(name, tiny_causal, tmp_path):
    run = load_config(None, [f"model.name={tiny_causal}", f"data.path={CORPUS / 'data' / name}", f"training.output_dir={tmp_path / 'out'}"])
    with pytest.raises(DataError) as err:
        train(run)
    text = " ".join(str(err.value).split())
    for expected in BROKEN_DATA[name]:
        assert expected in text, text
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(BROKEN_CONFIGS))
def test_broken_configs_are_refused_with_every_problem_at_once(name):
    with pytest.raises(ConfigError) as err:
        load_config(CORPUS / "configs" / name)
    text = str(err.value)
    for expected in BROKEN_CONFIGS[name]:
        assert expected in text, text
    assert not ray.is_initialized()


def test_skipping_bad_rows_is_said_not_silent(tiny_causal, tmp_path):
    from jobs.data.driver import prepare
    from jobs.model import load_tokenizer
    from jobs.prompting import Prompting

    run = load_config(None, [f"model.name={tiny_causal}", f"data.path={CORPUS / 'data' / 'missing-fields.jsonl'}", "data.bad_rows=skip",
                             "data.validation_fraction=0"])
    data = prepare(run.data, Prompting(load_tokenizer(run.model), "causal", True))
    assert len(data.train) == 1
    assert data.report["rows_read"] == 5 and data.report["bad_rows"] == 4 and len(data.report["bad_row_details"]) == 4
