"""Model loading: tiny random T5 and Llama through 4-bit/8-bit + LoRA, save and reload."""

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer

from jobs.config import ConfigError, load_config
from jobs.data.driver import prepare
from jobs.model import load_adapter, load_base, load_for_training, model_kind, uses_chat_template
from jobs.prompting import Prompting
from jobs.train import training_arguments

CPU = torch.device("cpu")


def _run(model_dir, tmp_path, *overrides):
    return load_config(None, [f"model.name={model_dir}", f"training.output_dir={tmp_path}", "data.demo_rows=64", *overrides])


@pytest.mark.parametrize("fixture,expected_kind", [("tiny_causal", "causal"), ("tiny_seq2seq", "seq2seq")])
def test_qlora_trains_saves_and_reloads_to_identical_logits(fixture, expected_kind, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    run = _run(model_dir, tmp_path, "training.max_steps=6", "training.learning_rate=5e-3", "training.eval_steps=3", "training.logging_steps=1")
    kind = model_kind(run.model)
    assert kind == expected_kind
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare(run.data, Prompting(tokenizer, kind, uses_chat_template(run.model, tokenizer)))
    model = load_for_training(run, CPU, kind)

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()), "the frozen base is 4-bit"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), "only the LoRA matrices train"
    assert model.base_model.model.is_gradient_checkpointing

    trainer = Trainer(model=model, args=training_arguments(run, str(tmp_path / "hf"), True), train_dataset=data.train, eval_dataset=data.eval,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)([data.eval[i] for i in range(2)])
    model.eval()
    reloaded = load_adapter(run, tmp_path / "adapter", CPU, kind).eval()
    base = load_base(run, CPU, kind).eval()
    with torch.no_grad():
        trained_logits = model(**batch).logits
        reloaded_logits = reloaded(**batch).logits
        base_logits = base(**batch).logits
    assert torch.equal(trained_logits, reloaded_logits)
    assert not torch.allclose(trained_logits, base_logits), "the adapter changes the model"


def test_an_evaluation_leaves_the_4bit_base_training_as_before(tiny_causal, tmp_path):
    """On CPUs with AVX-512 BF16, bitsandbytes repacks 4-bit weights at the first eval-mode forward
    without grad and then runs a fused kernel that rounds differently and has no autograd. Unguarded,
    after the Trainer's first evaluation the q, k, v, gate and up LoRA matrices got zero gradient and
    eval logits moved by about 3e-4. On other CPUs bitsandbytes never repacks and this holds anyway."""
    run = _run(tiny_causal, tmp_path, "lora.dropout=0.0")
    model = load_for_training(run, CPU, "causal")
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal)
    data = prepare(run.data, Prompting(tokenizer, "causal", True))
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)([data.train[i] for i in range(4)])

    def lora_gradients():
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def eval_logits():
        model.eval()
        with torch.no_grad():
            return model(**batch).logits

    before, logits_before = lora_gradients(), eval_logits()
    after, logits_after = lora_gradients(), eval_logits()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(logits_before, logits_after)


def test_8bit_and_unquantized_bases(tiny_causal, tmp_path):
    eight = load_for_training(_run(tiny_causal, tmp_path, "quantization.mode=8bit"), CPU, "causal")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in eight.modules())
    full = load_for_training(_run(tiny_causal, tmp_path, "quantization.mode=none", "lora.target_modules=[q_proj, v_proj]"), CPU, "causal")
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in full.modules())
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in full.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}


def test_chat_template_required_but_missing_is_a_config_error(tiny_seq2seq, tmp_path):
    run = _run(tiny_seq2seq, tmp_path, "model.chat_template=true")
    with pytest.raises(ConfigError, match="has no chat template; set model.chat_template=false"):
        uses_chat_template(run.model, AutoTokenizer.from_pretrained(tiny_seq2seq))


def test_adapters_without_safetensors_are_refused(tiny_causal, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_adapter(_run(tiny_causal, tmp_path), tmp_path / "adapter", CPU, "causal")


def test_adapter_init_follows_the_training_seed(tiny_causal, tmp_path):
    def lora_a(seed):
        model = load_for_training(_run(tiny_causal, tmp_path, f"training.seed={seed}"), CPU, "causal")
        return next(p for n, p in model.named_parameters() if "lora_A" in n).detach().clone()

    assert torch.equal(lora_a(1), lora_a(1))
    assert not torch.equal(lora_a(1), lora_a(2))


def test_remote_code_in_a_checkpoint_is_never_run_unless_the_config_allows_it(tiny_causal, tmp_path):
    import json
    import shutil

    folder = tmp_path / "with-code"
    shutil.copytree(tiny_causal, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = "evil-llama"  # an architecture only the shipped code knows
    (folder / "config.json").write_text(json.dumps(config))
    run = load_config(None, [f"model.name={folder}", "quantization.mode=none"])
    assert run.model.trust_remote_code is False
    with pytest.raises(Exception, match="trust_remote_code"):
        load_base(run, torch.device("cpu"), "causal")
    assert not marker.exists()
