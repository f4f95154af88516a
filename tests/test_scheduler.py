"""The HF engine's step loop (`serve.scheduler`) without Ray: requests that share decoding steps, join a running
batch or carry their own sampling settings get what each gets alone, and an evicted adapter stays until its
requests end."""

import threading
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs.config import ModelConfig
from jobs.prompting import Prompting
from serve.generation import GenRequest, eos_token_ids
from serve.grammar import Grammars
from serve.model_thread import ModelThread
from serve.multi_lora import MultiLora
from serve.scheduler import Scheduler, can_schedule
from tests.serve_fixtures import make_adapter

PROMPTS = ["first second third", "what who when", "the a of in is was", "output input"]
TIMEOUT_S = 60
# fp32 sums in other orders (other batch shapes, padding): logprobs of the same token measured at most 5e-7 apart;
# a position off by one in the decoding step moves them past this (the generate test fails).
ATOL = 1e-5


class Answer:
    """One request's text per choice, filled from the scheduler's thread."""

    def __init__(self, n: int = 1):
        self.texts, self.finish, self.left, self.done = [""] * n, [None] * n, n, threading.Event()
        self.deltas = 0
        self.logprobs: list[list[float]] = [[] for _ in range(n)]

    def __call__(self, item) -> None:
        if isinstance(item, Exception):
            self.texts, self.left = [repr(item)], 0
            self.done.set()
            return
        self.deltas += 1
        self.texts[item.index] += item.text
        self.logprobs[item.index] += [entry["logprob"] for entry in item.logprobs or []]
        if item.finish:
            self.finish[item.index] = item.finish
            self.left -= 1
            if not self.left:
                self.done.set()

    def wait(self) -> list[str]:
        assert self.done.wait(TIMEOUT_S), "the request never finished"
        return self.texts


@pytest.fixture(scope="module")
def engine(tiny_causal, tmp_path_factory):
    root = tmp_path_factory.mktemp("scheduler-adapters")
    folders = {f"a{i}": make_adapter(tiny_causal, root / f"a{i}", seed=i) for i in range(1, 8)}
    folders["qv"] = make_adapter(tiny_causal, root / "qv", seed=9, targets=["q_proj", "v_proj"], rank=8)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal).eval()
    prompting = Prompting.load(ModelConfig(name=tiny_causal))
    lora = MultiLora(model, torch.device("cpu"))

    def ensure(name):
        if name not in lora:
            lora.load(name, folders[name])

    tokenizer = prompting.tokenizer
    scheduler = Scheduler(model, lora, prompting, eos_token_ids(model, tokenizer), Grammars(tokenizer, model.config.vocab_size),
                          ModelThread(), 32, ensure, lambda exc: exc)
    assert can_schedule(model, prompting.kind)
    return scheduler, folders


def _request(scheduler, prompt, adapter=None, **settings):
    ids = scheduler.prompting.ids(prompt)
    return GenRequest(prompt_ids=ids, max_tokens=settings.pop("max_tokens", 12), adapter=adapter, temperature=settings.pop("temperature", 0.0), **settings)


def _together(scheduler, requests):
    answers = [Answer(r.n) for r in requests]
    _submit_at_once(scheduler, requests, answers)
    return [answer.wait() for answer in answers]


def _submit_at_once(scheduler, requests, answers):
    """Every request arrives before the next turn (submitted from the model thread itself): one prefill, one batch."""
    scheduler.thread.call(lambda: [scheduler.submit(r, a) for r, a in zip(requests, answers)]).result()


def _alone(scheduler, request):
    return _together(scheduler, [request])[0]


def _logprobs(scheduler, requests) -> list[list[float]]:
    answers = [Answer(r.n) for r in requests]
    _submit_at_once(scheduler, requests, answers)
    for answer in answers:
        answer.wait()
    return [answer.logprobs[0] for answer in answers]


def _close(mine: list[float], theirs: list[float]) -> bool:
    return len(mine) == len(theirs) and torch.allclose(torch.tensor(mine), torch.tensor(theirs), atol=ATOL)


def test_a_mixed_batch_of_eight_adapters_and_the_base_answers_as_each_alone(engine):
    scheduler, folders = engine
    requests = [_request(scheduler, PROMPTS[i % len(PROMPTS)], adapter) for i, adapter in enumerate([*folders, None] * 2)]
    mixed = _together(scheduler, requests)
    alone = [_alone(scheduler, r) for r in requests]
    assert mixed == alone
    assert len({tuple(a) for a in alone[:9]}) > 4, "adapters that all answer alike would test nothing"
    with_logprobs = [replace(r, logprobs=0) for r in requests]
    for mine, theirs in zip(_logprobs(scheduler, with_logprobs), [_logprobs(scheduler, [r])[0] for r in with_logprobs]):
        assert _close(mine, theirs), (mine, theirs)


def test_the_step_loop_answers_as_transformers_generate(engine):
    scheduler, _ = engine
    for prompt in PROMPTS:
        request = _request(scheduler, prompt, max_tokens=10, logprobs=0)
        ids = torch.tensor([request.prompt_ids])
        with torch.inference_mode():
            out = scheduler.model.generate(ids, max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True,
                                           pad_token_id=scheduler.prompting.tokenizer.pad_token_id)
        new = out.sequences[0, ids.shape[1]:]
        expected = [float(torch.log_softmax(score[0], -1)[token]) for score, token in zip(out.scores, new)]
        assert _alone(scheduler, request) == [scheduler.prompting.tokenizer.decode(new, skip_special_tokens=True)]
        assert _close(_logprobs(scheduler, [request])[0], expected)


def test_a_request_that_joins_while_others_decode_answers_as_alone(engine):
    scheduler, _ = engine
    long = _request(scheduler, PROMPTS[0], "a1", max_tokens=60, logprobs=0)
    short = _request(scheduler, PROMPTS[3], "a2", max_tokens=20, logprobs=0)
    first = Answer()
    scheduler.submit(long, first)
    while first.deltas < 5 and not first.done.is_set():  # the long one is decoding
        first.done.wait(0.01)
    assert not first.done.is_set(), "the long request ended before the other joined: the test would show nothing"
    second = Answer()
    scheduler.submit(short, second)
    assert second.wait() == _alone(scheduler, short)
    assert first.wait() == _alone(scheduler, long)
    assert _close(second.logprobs[0], _logprobs(scheduler, [short])[0])
    assert _close(first.logprobs[0], _logprobs(scheduler, [long])[0])


def test_each_request_keeps_its_own_sampling_settings_in_a_shared_batch(engine):
    scheduler, _ = engine
    requests = [
        _request(scheduler, PROMPTS[0], "a1", temperature=0.9, top_p=0.8, seed=3, max_tokens=16),
        _request(scheduler, PROMPTS[0], "a1", temperature=1.5, seed=4, max_tokens=16, n=2),
        _request(scheduler, PROMPTS[1], None, max_tokens=16),
        _request(scheduler, PROMPTS[2], "qv", temperature=0.7, seed=5, max_tokens=16, logprobs=2),
    ]
    together = _together(scheduler, requests)
    assert together == [_alone(scheduler, r) for r in requests], "a seeded request draws the same tokens whatever shares its steps"
    assert together[1][0] != together[1][1], "n choices of one request are different draws"
    assert together[0] != _alone(scheduler, _request(scheduler, PROMPTS[0], "a1", temperature=0.9, top_p=0.8, seed=6, max_tokens=16))


def test_an_adapter_evicted_while_its_request_decodes_stays_until_the_request_ends(engine):
    scheduler, _ = engine
    request = _request(scheduler, PROMPTS[1], "a3", max_tokens=40)
    expected = _alone(scheduler, request)
    answer = Answer()
    scheduler.submit(request, answer)
    while answer.deltas < 3 and not answer.done.is_set():
        answer.done.wait(0.01)
    scheduler.thread.call(lambda: scheduler.lora.unload("a3")).result()  # what Serve's LRU eviction does
    assert "a3" not in scheduler.lora
    assert answer.wait() == expected
    assert "a3" not in scheduler.lora.slots, "unloaded once its request ended"
