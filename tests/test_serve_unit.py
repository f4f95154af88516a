"""Unit tier for serving: adapter registry, request checks, token streaming, the Serve config file."""

import json
import os
import shutil

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from jobs.adapter import vllm_problems
from jobs.cli import app as cli
from jobs.config import ConfigError, load_config
from serve import adapters, protocol
from serve.app import application, build_app, serve_config
from serve.choice import EngineChoice, choose
from serve.generation import GenRequest, Progress
from serve.vllm_engine import zero_adapter
from tests import tiny_models
from tests.serve_fixtures import make_adapter


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_causal):
    root = tmp_path_factory.mktemp("registry")
    make_adapter(tiny_causal, root / "alpha", seed=1)
    pickled = root / "pickled"  # a .bin adapter: pickle can run code, so it is not an adapter here
    shutil.copytree(root / "alpha", pickled)
    (pickled / adapters.WEIGHTS).rename(pickled / "adapter_model.bin")
    outside = tmp_path_factory.mktemp("outside")
    make_adapter(tiny_causal, outside / "secret", seed=2)
    os.symlink(outside / "secret", root / "escape")  # a link out of the registry
    return root


def _serve_cfg(root, **extra):
    overrides = [f"serve.adapter_root={root}"] + [f"serve.{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides).serve


def test_registry_lists_and_resolves_only_safetensors_adapters_inside_the_root(registry):
    cfg = _serve_cfg(registry)
    assert adapters.names(cfg) == ["alpha"]
    assert adapters.resolve(cfg, "alpha") == (registry / "alpha").resolve()
    for name in ["pickled", "escape", "../outside", "..", "/etc/passwd", "a/b", "missing", "x" * 65, ""]:
        with pytest.raises(adapters.UnknownAdapter):
            adapters.resolve(cfg, name)


def test_a_folder_added_to_the_registry_is_servable_at_once(registry, tmp_path):
    cfg = _serve_cfg(registry)
    staging = registry / ".incoming-beta"
    shutil.copytree(registry / "alpha", staging)
    assert "beta" not in adapters.names(cfg)
    staging.rename(registry / "beta")
    try:
        assert "beta" in adapters.names(cfg)
        assert adapters.resolve(cfg, "beta").name == "beta"
    finally:
        shutil.rmtree(registry / "beta")


def test_serve_config_errors_are_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["serve.adapters={../up: x, ok: y}", "serve.min_replicas=3", "serve.max_replicas=2", "serve.default_max_tokens=2000",
                           "serve.max_batch_size=128"])
    text = str(err.value)
    for fragment in ["serve.adapters = ['../up']", "serve.min_replicas = 3", "serve.default_max_tokens = 2000", "serve.max_ongoing_requests = 64"]:
        assert fragment in text
    with pytest.raises(ConfigError, match="serve.max_batch_sise = 4: unknown key; did you mean 'max_batch_size'"):
        load_config(None, ["serve.max_batch_sise=4"])


def test_requests_are_checked_field_by_field():
    ok = protocol.CompletionRequest.model_validate({"model": "m", "prompt": ["hi"], "stop": "\n"})
    assert ok.prompt == "hi" and ok.stop == ["\n"]
    bad = [
        {"model": "m", "prompt": ""},
        {"model": "m", "prompt": ["a", "b"]},
        {"model": "m", "prompt": "hi", "stop": ["1", "2", "3", "4", "5"]},
        {"model": "m", "prompt": "hi", "temperature": -1},
        {"model": "m", "prompt": "hi", "n": 17},
        {"model": "m", "prompt": "hi", "logprobs": 6},
        {"model": "m", "prompt": "hi", "echo": True},
        {"model": "m", "prompt": "hi", "presence_penalty": 0.5},
        {"model": "m", "prompt": "hi", "logit_bias": {"50256": -100}},
        {"model": "m", "prompt": "hi", "suffix": "end"},
        {"model": "m", "prompt": "hi", "best_of": 2},
        {"model": "m", "prompt": "hi", "response_format": {"type": "json_schema"}},
        {"model": "m", "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}},
        {"model": "m", "prompt": "hi", "response_format": {"type": "xml"}},
        {"model": "m", "prompt": "bad \ud800 surrogate"},
        {"model": 5, "prompt": "hi"},
        {"prompt": "hi"},
    ]
    for body in bad:
        with pytest.raises(ValidationError):
            protocol.CompletionRequest.model_validate(body)
    with pytest.raises(ValidationError):
        protocol.ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]})
    chat = protocol.ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert chat.messages[0].content == "ab"
    with pytest.raises(ValidationError, match="tools: not supported"):
        protocol.ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]})
    # What some clients send by default is not a request for a feature.
    protocol.ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "tools": None})


def _progress(stop, max_tokens=10):
    tokenizer = tiny_models.build_tokenizer("causal")
    sent = []
    request = GenRequest(prompt_ids=[1], max_tokens=max_tokens, stop=stop)
    progress = Progress([request], tokenizer, {tokenizer.eos_token_id}, sent.append)
    return tokenizer, progress, sent


def _feed(tokenizer, progress, words):
    import torch

    for word in words:
        progress(torch.tensor([[tokenizer.convert_tokens_to_ids(word)]]), None)


def test_stream_holds_back_a_possible_stop_string_and_cuts_it():
    tokenizer, progress, sent = _progress(stop=["first third"])
    _feed(tokenizer, progress, ["first"])
    assert sent[-1] == [None]  # "first" may start the stop string: held back
    _feed(tokenizer, progress, ["second"])
    assert sent[-1][0].text == "first second"  # it did not: released
    _feed(tokenizer, progress, ["first", "third"])
    assert sent[-1][0].finish == "stop"
    assert "".join(d.text for [d] in sent if d) == "first second "  # cut where the stop string starts


def test_stream_finishes_each_row_at_its_own_limit_or_eos():
    tokenizer, progress, sent = _progress(stop=[], max_tokens=2)
    _feed(tokenizer, progress, ["first", "second"])
    assert sent[-1][0].finish == "length" and sent[-1][0].completion_tokens == 2
    tokenizer, progress, sent = _progress(stop=[])
    _feed(tokenizer, progress, ["first", tokenizer.eos_token])
    assert sent[-1][0].finish == "stop" and "".join(d.text for [d] in sent if d) == "first"


def test_build_writes_a_serve_config_that_serve_deploy_accepts(registry, tiny_causal, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    run = load_config(None, [f"model.name={tiny_causal}", f"serve.adapter_root={registry}", "serve.api_key=sekret", "serve.max_replicas=3"])
    text = serve_config(run)
    assert "sekret" not in text
    doc = yaml.safe_load(text)
    ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    app_doc = doc["applications"][0]
    assert app_doc["import_path"] == "serve.app:build_app"
    built = build_app(app_doc["args"])  # what `serve deploy` calls
    assert type(built).__name__ == "Application"
    assert application(run) is not None


def test_cli_build_prints_the_config_and_refuses_missing_adapters(tiny_causal, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["serve", f"model.name={tiny_causal}", "--build"])
    assert ok.exit_code == 0, ok.output
    assert yaml.safe_load(ok.stdout)["applications"][0]["name"] == "lorafleet"
    missing = runner.invoke(cli, ["serve", f"model.name={tiny_causal}", f"serve.adapters.squad={tmp_path / 'nope'}", "--build"])
    assert missing.exit_code == 2
    assert "serve.adapters.squad" in missing.output and "train or sweep first" in missing.output


def test_the_engine_choice_and_its_reason(tiny_causal, tiny_seq2seq):
    def chosen(model, *overrides):
        return choose(load_config(None, [f"model.name={model}", "quantization.mode=none", *overrides]))

    assert chosen(tiny_causal).name == "hf" and "CPU replicas" in chosen(tiny_causal).reason
    assert chosen(tiny_causal, "serve.replica_resources={CPU: 1, GPU: 1}") == EngineChoice("vllm", "auto: GPU replicas and a causal model vLLM implements")
    assert "encoder-decoder" in chosen(tiny_seq2seq, "serve.replica_resources={GPU: 1}").reason
    assert chosen(tiny_causal, "serve.replica_resources={GPU: 1}", "serve.quantization=4bit").name == "hf"
    assert chosen(tiny_causal, "serve.engine=vllm") == EngineChoice("vllm", "serve.engine: vllm")  # on CPU too, when asked
    assert chosen(tiny_causal, "serve.engine=hf", "serve.replica_resources={GPU: 1}").name == "hf"
    with pytest.raises(ConfigError) as refused:
        chosen(tiny_seq2seq, "serve.engine=vllm")
    assert "serve.engine = 'vllm'" in str(refused.value) and "encoder-decoder" in str(refused.value) and "serve.engine: hf" in str(refused.value)


def test_vllm_with_a_bitsandbytes_base_is_a_config_error():
    with pytest.raises(ConfigError, match=r"serve.quantization = '4bit'.*serve.quantization=none"):
        load_config(None, ["serve.engine=vllm", "serve.quantization=4bit"])


def test_adapters_vllm_cannot_load_are_named_with_what_to_retrain(tmp_path, tiny_causal):
    plain = make_adapter(tiny_causal, tmp_path / "plain", seed=1)
    assert vllm_problems(plain, max_rank=8) == []
    assert vllm_problems(plain, max_rank=2)[0].startswith("its rank r=4 is above the engine's maximum 2: raise serve.vllm_max_lora_rank")
    config = json.loads((plain / adapters.CONFIG).read_text())
    odd = tmp_path / "odd"
    shutil.copytree(plain, odd)
    (odd / adapters.CONFIG).write_text(json.dumps({**config, "modules_to_save": ["lm_head"], "use_dora": True, "target_modules": ["q_proj", "embed_tokens"]}))
    found = " | ".join(vllm_problems(odd, max_rank=8))
    assert "modules_to_save ['lm_head']" in found and "DoRA" in found and "['embed_tokens']" in found


def test_the_zero_adapter_covers_every_linear_layer_with_zeros(tmp_path, tiny_causal_vllm):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_causal_vllm))
    folder = zero_adapter(shape, tmp_path / "cache")
    weights = load_file(folder / adapters.WEIGHTS)
    assert len(weights) == 2 * 7 * 2 and all(not t.any() for t in weights.values())  # 7 projections x 2 layers, A and B
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, shape.config.hidden_size)
    assert json.loads((folder / adapters.CONFIG).read_text())["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_every_replica_of_a_base_shares_one_zero_adapter_folder(tmp_path, tiny_causal_vllm):
    """A replica restarted or added by autoscaling writes nothing new; another base gets a folder of its own."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_causal_vllm)
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(config)
        wider = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_causal_vllm, intermediate_size=2 * config.intermediate_size))
    cache = tmp_path / "cache"
    first = zero_adapter(shape, cache)
    written = (first / adapters.WEIGHTS).stat().st_mtime_ns
    assert zero_adapter(shape, cache) == first and (first / adapters.WEIGHTS).stat().st_mtime_ns == written
    other = zero_adapter(wider, cache)
    assert other != first and sorted(p.name for p in cache.iterdir()) == sorted([first.name, other.name])  # no staging left


def test_chat_messages_reach_the_template_in_the_training_examples_form():
    from jobs import conversations

    call = [{"id": "c1", "type": "function", "function": {"name": "locker", "arguments": "{}"}}]
    sent = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Code?"}]},
            {"role": "assistant", "content": None, "tool_calls": call}, {"role": "tool", "tool_call_id": "c1", "content": "4821"},
            {"role": "assistant", "content": "4821."}]
    served = [m.as_template_input() for m in protocol.ChatRequest(model="m", messages=sent).messages]
    trained, problems = conversations.from_record({"messages": sent[1:]}, "messages", {}, None)
    assert problems == [] and served[0] == {"role": "system", "content": "Be brief."}
    assert served[1:] == trained
    with pytest.raises(ValidationError, match="needs content"):
        protocol.ChatRequest(model="m", messages=[{"role": "user", "content": None}])
