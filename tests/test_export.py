"""lorafleet export: merged models give the adapter's logits (tiny Llama and T5, fp32 within 1e-3 on
20 prompts), load as plain checkpoints and as lorafleet's base model; --check vllm refuses what vLLM
cannot load, with what to retrain."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
from typer.testing import CliRunner

from jobs.cli import app as cli
from jobs.config import ConfigError, ModelConfig, load_config
from jobs.demo_data import demo_rows
from jobs.export import merge
from jobs.prompting import Prompting
from tests.serve_fixtures import make_adapter

PROMPTS = [r["input"] for r in demo_rows(20, seed=2)]


def _logits(model, tokenizer, seq2seq: bool) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")
            extra = {"decoder_input_ids": torch.tensor([[0, 5, 9]])} if seq2seq else {}
            out.append(model(**ids, **extra).logits)
    return out


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_the_merged_model_answers_as_the_adapter_on_its_unquantized_base(kind, tiny_causal, tiny_seq2seq, tmp_path):
    seq2seq = kind == "seq2seq"
    base = tiny_seq2seq if seq2seq else tiny_causal
    adapter = make_adapter(base, tmp_path / "adapter", seed=3, targets=["q", "v"] if seq2seq else "all-linear", seq2seq=seq2seq)
    run = load_config(None, [f"model.name={base}", "quantization.mode=4bit"])  # trained as QLoRA: merged unquantized
    out = merge(run, adapter, tmp_path / "merged")
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(out)
    expected = _logits(PeftModel.from_pretrained(auto.from_pretrained(base), adapter).eval(), tokenizer, seq2seq)
    got = _logits(auto.from_pretrained(out).eval(), tokenizer, seq2seq)
    assert max(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True)) < 1e-3
    plain = _logits(auto.from_pretrained(base).eval(), tokenizer, seq2seq)
    assert max(float((a - b).abs().max()) for a, b in zip(plain, got, strict=True)) > 1e-3  # the adapter did change it
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and (out / "model.safetensors").is_file()
    assert not list(out.glob("adapter_*")) and (out / "generation_config.json").is_file()
    prompting = Prompting.load(ModelConfig(name=str(out)))  # what lorafleet serve loads as a base model
    assert prompting.kind == kind and prompting.use_chat == (not seq2seq)


def test_merge_writes_the_dtype_asked_and_refuses_a_folder_in_use(tiny_causal, tmp_path):
    adapter = make_adapter(tiny_causal, tmp_path / "adapter", seed=4)
    run = load_config(None, [f"model.name={tiny_causal}"])
    out = merge(run, adapter, tmp_path / "bf16", dtype="bf16")
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match="exists and is not empty"):
        merge(run, adapter, out)
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        merge(run, tmp_path, tmp_path / "other")


def test_export_check_vllm_refuses_what_vllm_cannot_load_with_what_to_retrain(tiny_causal, tmp_path):
    runner = CliRunner()
    small = make_adapter(tiny_causal, tmp_path / "small", seed=5, rank=4)
    wide = make_adapter(tiny_causal, tmp_path / "wide", seed=6, rank=16)
    overrides = [f"model.name={tiny_causal}", "serve.vllm_max_lora_rank=8"]
    ok = runner.invoke(cli, ["export", "--adapter", str(small), "--check", "vllm", *overrides])
    assert ok.exit_code == 0 and "vllm can load" in ok.output, ok.output
    refused = runner.invoke(cli, ["export", "--adapter", str(wide), "--check", "vllm", *overrides])
    assert refused.exit_code == 1, refused.output
    assert "rank r=16 is above the engine's maximum 8" in " ".join(refused.output.split())
    config = json.loads((small / "adapter_config.json").read_text())
    (small / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"], "use_dora": True}))
    both = " ".join(runner.invoke(cli, ["export", "--adapter", str(small), "--check", "vllm", *overrides]).output.split())
    assert "retrain without modules_to_save" in both and "retrain it as plain LoRA" in both


def test_export_says_what_is_missing_and_writes_the_merged_folder(tiny_causal, tmp_path):
    runner = CliRunner()
    adapter = make_adapter(tiny_causal, tmp_path / "adapter", seed=7)
    nothing = runner.invoke(cli, ["export", "--adapter", str(adapter), "--dtype", "int4"])
    text = " ".join(nothing.output.split())
    assert nothing.exit_code == 2 and "--dtype = 'int4'" in text and "nothing to do" in text
    done = runner.invoke(cli, ["export", "--adapter", str(adapter), "--merged", str(tmp_path / "m"), f"model.name={tiny_causal}"])
    assert done.exit_code == 0 and (tmp_path / "m" / "model.safetensors").is_file(), done.output
