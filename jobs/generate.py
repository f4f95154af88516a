"""Batched generation whose outputs stay tied to their inputs.

- the prompt is built and truncated exactly as in training (`Prompting.text`; a conversation as the
  server renders it, `jobs.conversations.prompt_ids`);
- `max_new_tokens` only: a long prompt never eats the room for the answer;
- decoder-only models are padded on the left, so every row's new tokens start at the same column;
- batches group prompts of similar length, and every output is written back by its index;
- a batch that fails is retried example by example; what still fails, or comes back empty,
  is returned as a failure with its reason, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from jobs import conversations
from jobs.config import DataConfig, EvalConfig
from jobs.prompting import Prompting


@dataclass
class Generation:
    text: str | None
    error: str | None = None


def encode_prompt(prompt: str | list[dict], prompting: Prompting, data: DataConfig) -> list[int]:
    """A prompt text as in training, or a conversation's turns as the server renders them (oldest exchanges
    dropped while it is longer than data.max_length, as in training)."""
    if isinstance(prompt, str):
        return prompting.ids(prompting.text(prompt, data.system_prompt))[: data.max_source_length]
    ids = conversations.prompt_ids(prompting.tokenizer, prompt)
    while len(ids) > data.max_length and (shorter := conversations.drop_oldest_exchange(prompt, keep_an_answer=False)):
        prompt = shorter
        ids = conversations.prompt_ids(prompting.tokenizer, prompt)
    return ids


def cut_at_stop(text: str, stop: list[str]) -> str:
    positions = [text.find(s) for s in stop if s and s in text]
    return text[: min(positions)] if positions else text


def _generate_batch(model, prompting: Prompting, batch: list[list[int]], cfg: EvalConfig) -> list[str]:
    tokenizer = prompting.tokenizer
    inputs = prompting.pad_for_generation(batch).to(model.device)
    sampling = (
        {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
        if cfg.do_sample
        else {"do_sample": False}
    )
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=cfg.max_new_tokens,
            num_beams=cfg.num_beams,
            **sampling,
            stop_strings=cfg.stop or None,
            tokenizer=tokenizer if cfg.stop else None,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :] if prompting.kind == "causal" else output
    return [
        cut_at_stop(text, cfg.stop).strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    ]


def _one_by_one(model, prompting: Prompting, batch: list[list[int]], cfg: EvalConfig) -> list[Generation]:
    results = []
    for ids in batch:
        try:
            results.append(_as_generation(_generate_batch(model, prompting, [ids], cfg)[0]))
        except Exception as exc:  # one bad example must not hide the others' results
            results.append(Generation(None, f"{type(exc).__name__}: {exc}"))
    return results


def _as_generation(text: str) -> Generation:
    return Generation(text) if text else Generation(None, "empty generation")


def generate(
    model,
    prompting: Prompting,
    prompts: list[str | list[dict]],
    data: DataConfig,
    cfg: EvalConfig,
    desc: str = "Generating",
) -> list[Generation]:
    """One Generation per prompt (a text, or a conversation's messages), in the prompts' order."""
    if cfg.do_sample:
        torch.manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    encoded = [encode_prompt(p, prompting, data) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[Generation | None] = [None] * len(encoded)
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    for indices in tqdm(batches, desc=desc, unit="batch"):
        batch = [encoded[i] for i in indices]
        try:
            generations = [_as_generation(t) for t in _generate_batch(model, prompting, batch, cfg)]
        except Exception:  # retry alone, so each example gets its own result or its own error
            generations = _one_by_one(model, prompting, batch, cfg)
        for index, generation in zip(indices, generations, strict=True):
            results[index] = generation
    model.train(was_training)
    return results
