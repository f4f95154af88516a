"""Generation: batched outputs equal single-example outputs; failures are reported, not dropped."""

import pytest
import torch
from transformers import AutoTokenizer

from jobs.config import load_config
from jobs.generate import cut_at_stop, generate
from jobs.model import load_base
from jobs.prompting import Prompting

CPU = torch.device("cpu")
PROMPTS = [
    "Day: Monday",
    "Day: Tuesday, Time: 22:00 - 00:00, Score: 73, Dominance: Unrivaled, Shape: Sustained Plateau, Style: Urgent " * 3,
    "Score: 97",
    "Day: Thursday, Time: 09:00 - 12:00, Score: 97, Dominance: Clear Lead, Shape: Sustained Plateau, Style: Advisory",
    "output",
]


@pytest.mark.parametrize("fixture,kind,quant", [("tiny_causal", "causal", "none"), ("tiny_causal", "causal", "4bit"), ("tiny_seq2seq", "seq2seq", "none")])
def test_batch_generates_exactly_what_each_example_alone_generates(fixture, kind, quant, request):
    model_dir = request.getfixturevalue(fixture)
    run = load_config(None, [f"model.name={model_dir}", f"quantization.mode={quant}", "eval.max_new_tokens=12"])
    model, tokenizer = load_base(run, CPU, kind), AutoTokenizer.from_pretrained(model_dir)
    use_chat = kind == "causal"
    batched = generate(model, Prompting(tokenizer, kind, use_chat), PROMPTS, run.data, run.eval.model_copy(update={"batch_size": 5}))
    alone = [generate(model, Prompting(tokenizer, kind, use_chat), [p], run.data, run.eval)[0] for p in PROMPTS]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert len({g.text for g in batched}) > 1, "different prompts give different outputs (no mix-up possible to miss)"


def test_failures_are_reported_per_example(tiny_causal, monkeypatch):
    run = load_config(None, [f"model.name={tiny_causal}", "quantization.mode=none", "eval.max_new_tokens=4"])
    model, tokenizer = load_base(run, CPU, "causal"), AutoTokenizer.from_pretrained(tiny_causal)
    real_generate = model.generate

    def flaky(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 1 or kwargs["input_ids"].shape[1] > 20:
            raise RuntimeError("out of memory")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", flaky)
    results = generate(model, Prompting(tokenizer, "causal", True), [PROMPTS[0], PROMPTS[1]], run.data, run.eval)
    assert results[0].error is None and results[0].text
    assert results[1].text is None and results[1].error == "RuntimeError: out of memory"


def test_stop_strings_are_cut():
    assert cut_at_stop("answer}\n\nmore text", ["\n\n", "}"]) == "answer"
    assert cut_at_stop("no stop here", ["###"]) == "no stop here"


def test_plain_prompt_beam_search_and_seeded_sampling(tiny_causal):
    run = load_config(None, [f"model.name={tiny_causal}", "quantization.mode=none", "eval.max_new_tokens=6"])
    model, tokenizer = load_base(run, CPU, "causal"), AutoTokenizer.from_pretrained(tiny_causal)
    plain = generate(model, Prompting(tokenizer, "causal", False), PROMPTS[:2], run.data, run.eval)
    beams = generate(model, Prompting(tokenizer, "causal", False), PROMPTS[:2], run.data, run.eval.model_copy(update={"num_beams": 3}))
    sampling = run.eval.model_copy(update={"do_sample": True, "temperature": 1.5, "seed": 7})
    first, again = (generate(model, Prompting(tokenizer, "causal", False), PROMPTS[:2], run.data, sampling) for _ in range(2))
    assert all(g.text for g in plain + beams + first)
    assert [g.text for g in first] == [g.text for g in again], "sampling is seeded"
    assert [g.text for g in first] != [g.text for g in plain]
