"""Padding-free packing (training.packing: padding_free): a batch packed into rows trains exactly as the
padded one (loss and gradients), on sdpa and eager attention; refused where it cannot work."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening

from jobs.config import ConfigError, load_config
from jobs.data import encode
from jobs.demo_data import demo_rows
from jobs.prompting import Prompting
from jobs.train import check_packing, collator, training_arguments
from jobs.train.packing import first_fit_rows


def _batch(tiny_causal: str):
    run = load_config(None, [f"model.name={tiny_causal}", "quantization.mode=none", "training.packing=padding_free"])
    prompting = Prompting.load(run.model)
    rows = demo_rows(6, seed=1)
    features = [
        {k: v for k, v in encode({"prompt": r["input"], "target": r["output"]}, prompting, run.data).items()
         if k in ("input_ids", "attention_mask", "labels")}
        for r in rows
    ]
    assert len({len(f["input_ids"]) for f in features}) > 1  # lengths differ: the padded batch has padding
    return run, prompting, features


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_padding_free_batch_has_the_padded_batchs_loss_and_gradients(tiny_causal, attention):
    run, prompting, features = _batch(tiny_causal)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal, attn_implementation=attention)
    model.config.use_cache = False  # as in training (jobs/model.py)
    padded = DataCollatorForSeq2Seq(prompting.tokenizer, label_pad_token_id=-100)(features)
    packed = collator(run, prompting)(features)
    real = int(padded["attention_mask"].sum())
    assert "attention_mask" not in packed and packed["input_ids"].shape[1] <= 2 * padded["input_ids"].shape[1]
    assert 1 < packed["input_ids"].shape[0] < len(features)  # several rows, fewer than the examples
    assert real < packed["input_ids"].numel() <= padded["input_ids"].numel()  # a row ends in padding: tested too
    loss, grads = _loss_and_grads(model, padded)
    packed_loss, packed_grads = _loss_and_grads(model, packed)
    assert packed_loss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The control: the same flattened row without position ids lets examples attend to each other.
    mixed = DataCollatorWithFlattening(return_position_ids=False, separator_id=-100)(features)
    assert _loss_and_grads(model, mixed)[0] != pytest.approx(loss, rel=1e-3)


def test_packing_is_refused_for_seq2seq_and_remote_code_models_with_the_fix(tiny_seq2seq, tiny_causal):
    run = load_config(None, [f"model.name={tiny_seq2seq}", "training.packing=padding_free"])
    with pytest.raises(ConfigError, match=r"training.packing = 'padding_free': .*encoder-decoder.*training.packing: none"):
        check_packing(run, "seq2seq")
    remote = load_config(None, [f"model.name={tiny_causal}", "training.packing=padding_free", "model.trust_remote_code=true"])
    with pytest.raises(ConfigError, match="remote code"):
        check_packing(remote, "causal")
    check_packing(load_config(None, [f"model.name={tiny_causal}", "training.packing=padding_free"]), "causal")


def test_group_by_length_picks_the_length_grouped_sampler(tmp_path):
    args = training_arguments(load_config(None, ["training.group_by_length=true"]), str(tmp_path), True)
    assert args.train_sampling_strategy == "group_by_length"
    assert training_arguments(load_config(None, []), str(tmp_path), True).train_sampling_strategy == "random"


def test_rows_are_filled_longest_first_and_never_wider_than_asked():
    assert first_fit_rows([5, 2, 3, 9, 4], width=9) == [[3], [0, 4], [2, 1]]
    assert first_fit_rows([3, 3, 3], width=3) == [[0], [1], [2]]
    lengths = [17, 3, 11, 8, 8, 1, 6, 12, 2]
    for width in (17, 34):
        rows = first_fit_rows(lengths, width)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= width for row in rows)
    assert len(first_fit_rows(lengths, 34)) == 2  # 68 tokens fill two rows of 34 exactly
