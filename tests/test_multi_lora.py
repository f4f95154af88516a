"""The HF engine's batched multi-LoRA op (`serve.multi_lora`) against PEFT, the reference: every row of a mixed
batch gets what PEFT gives that adapter alone, base rows get the base exactly, and slots are filled and freed."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from serve import multi_lora
from serve.multi_lora import AdapterFormatError, MultiLora
from tests.serve_fixtures import make_adapter

# fp32 sums in another order (a gather and batched matmuls, against PEFT's per-adapter matmuls): measured
# differences are at most 2e-7 on these logits (of about 0.4); 1e-5 is far below what would move a greedy choice of a real adapter.
ATOL = 1e-5
PROMPTS = ["first second third", "what who when", "the a of in is was", "output input"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_causal):
    root = tmp_path_factory.mktemp("multi-lora")
    folders = {f"all-{i}": make_adapter(tiny_causal, root / f"all-{i}", seed=i) for i in range(1, 7)}
    folders["qv-r8"] = make_adapter(tiny_causal, root / "qv-r8", seed=7, targets=["q_proj", "v_proj"], rank=8)  # other rank, fewer modules
    folders["mlp-r2"] = make_adapter(tiny_causal, root / "mlp-r2", seed=8, targets=["gate_proj", "down_proj"], rank=2)
    return folders


def _logits(model, tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**batch).logits


def _reference(tiny_causal, folder, tokenizer, prompts):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_causal), str(folder)).eval()
    return _logits(model, tokenizer, prompts)


@pytest.mark.parametrize("dense_width", [multi_lora.DENSE_WIDTH, 0], ids=["every-slot-masked", "per-row-gather"])
def test_a_mixed_batch_of_eight_adapters_and_the_base_matches_each_alone(tiny_causal, adapters, dense_width, monkeypatch):
    monkeypatch.setattr(multi_lora, "DENSE_WIDTH", dense_width)
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal).eval()
    plain = _logits(base, tokenizer, PROMPTS)
    lora = MultiLora(base, torch.device("cpu"))
    for name, folder in adapters.items():
        lora.load(name, folder)
    names = [*adapters, None]  # 8 adapters and the base, 2 prompts each
    rows = [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(names * 2)]
    with lora.routing([name for name, _ in rows]):
        mixed = _logits(base, tokenizer, [prompt for _, prompt in rows])
    for index, (name, prompt) in enumerate(rows):
        alone = plain[PROMPTS.index(prompt)] if name is None else _reference(tiny_causal, adapters[name], tokenizer, [prompt])[0]
        mine = mixed[index, -alone.shape[0]:] if tokenizer.padding_side == "left" else mixed[index, : alone.shape[0]]
        if name is None:
            assert torch.equal(mine, alone), "a base row adds exactly zero"
        else:
            assert torch.allclose(mine, alone, atol=ATOL), (name, (mine - alone).abs().max())
    with lora.routing(["all-1"] * 2):  # one adapter for every row: the path without a gather
        single = _logits(base, tokenizer, PROMPTS[:2])
    assert torch.allclose(single, _reference(tiny_causal, adapters["all-1"], tokenizer, PROMPTS[:2]), atol=ATOL)
    assert torch.equal(_logits(base, tokenizer, PROMPTS), plain), "outside routing the base is untouched"


def test_evicting_an_adapter_frees_its_slot_for_the_next_one(tiny_causal, adapters):
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal).eval()
    lora = MultiLora(base, torch.device("cpu"))
    lora.load("qv-r8", adapters["qv-r8"])
    lora.load("all-1", adapters["all-1"])
    slot = lora.slots["qv-r8"]
    lora.unload("qv-r8")
    lora.load("mlp-r2", adapters["mlp-r2"])  # fewer modules than the slot's previous adapter: the rest must be zero
    assert lora.slots["mlp-r2"] == slot and "qv-r8" not in lora
    with lora.routing(["mlp-r2"]):
        mine = _logits(base, tokenizer, PROMPTS[:1])
    assert torch.allclose(mine, _reference(tiny_causal, adapters["mlp-r2"], tokenizer, PROMPTS[:1]), atol=ATOL)


def test_lora_features_the_op_does_not_compute_are_refused_and_leave_no_trace(tiny_causal, adapters, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_causal).eval()
    lora = MultiLora(base, torch.device("cpu"))
    dora = tmp_path / "dora"
    dora.mkdir()
    for file in adapters["all-1"].iterdir():
        (dora / file.name).write_bytes(file.read_bytes())
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterFormatError, match="use_dora"):
        lora.load("dora", dora)
    biased = tmp_path / "biased"  # what lora.bias: lora_only saves beside the LoRA matrices
    biased.mkdir()
    for file in adapters["all-1"].iterdir():
        (biased / file.name).write_bytes(file.read_bytes())
    tensors = load_file(biased / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, biased / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="retrain with lora.bias: none"):
        lora.load("biased", biased)
    assert not lora.slots and "dora" not in lora and "biased" not in lora


def test_seq2seq_rows_go_through_their_own_adapters(tiny_seq2seq, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_seq2seq)
    folders = [make_adapter(tiny_seq2seq, tmp_path / f"t5-{i}", seed=i, targets=["q", "v"], seq2seq=True) for i in (1, 2)]
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq).eval()
    lora = MultiLora(base, torch.device("cpu"))
    for i, folder in enumerate(folders):
        lora.load(f"t5-{i}", folder)
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    start = torch.full((2, 1), base.config.decoder_start_token_id)
    with lora.routing(["t5-0", "t5-1"]), torch.inference_mode():
        mixed = base(**batch, decoder_input_ids=start).logits
    for index, folder in enumerate(folders):
        reference = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq), str(folder)).eval()
        one = tokenizer([PROMPTS[index]], return_tensors="pt")
        with torch.inference_mode():
            alone = reference(**one, decoder_input_ids=start[:1]).logits[0]
        assert torch.allclose(mixed[index], alone, atol=ATOL)
