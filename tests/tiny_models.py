"""Tiny random models (T5 and Llama) with an offline word-level tokenizer, for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from jobs.demo_data import demo_rows

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    rows = demo_rows(300, seed=0)
    extra = ["Question: Context: Answer: what who when where which how the a of in is was", "output input first second third", "system user assistant"]
    return [r["input"] for r in rows] + [r["output"] for r in rows] + extra


def build_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "</s>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(_corpus(), trainers.WordLevelTrainer(special_tokens=specials, vocab_size=2000))
    if kind == "seq2seq":  # T5 appends </s> to every sequence
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<s>", unk_token="<unk>")
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build(kind: str, folder: Path, head_dim: int | None = None) -> Path:
    """Save a tiny random model + tokenizer to `folder` (seeded, so every build is identical).

    `head_dim` (Llama only): vLLM's CPU attention takes 32, 64, 80, ... but not the default 16.
    """
    torch.manual_seed(0)
    tokenizer = build_tokenizer(kind)
    vocab = len(tokenizer)
    if kind == "seq2seq":
        config = T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
        model = T5ForConditionalGeneration(config)
        with torch.no_grad():  # T5 ties input and output embeddings: a random <pad> row makes the decoder echo its start token forever
            model.shared.weight[tokenizer.pad_token_id].zero_()
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, head_dim=head_dim or 16, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
