"""How text becomes this model's input: the tokenizer, the model kind and whether prompts go
through the chat template, carried together, since data, generation, evaluation and Serve need
all three at once and must treat a prompt exactly alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from jobs.config import ModelConfig


@dataclass(frozen=True)
class Prompting:
    tokenizer: Any  # a transformers tokenizer
    kind: Literal["causal", "seq2seq"]  # causal: prompt and answer in one sequence; seq2seq: encoder in, decoder out
    use_chat: bool  # prompts are wrapped in the tokenizer's chat template

    @classmethod
    def load(cls, cfg: ModelConfig) -> Prompting:
        # Imported here: a Prompting unpickled in a Ray Data tokenizer task then needs only the tokenizer's own
        # module, not torch and the model code, whose imports cost more than the task's work.
        from jobs.model import load_tokenizer, model_kind, uses_chat_template

        tokenizer = load_tokenizer(cfg)
        return cls(tokenizer, model_kind(cfg), uses_chat_template(cfg, tokenizer))

    def text(self, prompt: str, system_prompt: str | None) -> str:
        """The exact text the model sees before its answer, in training, evaluation and serving."""
        if not self.use_chat:
            return prompt
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def ids(self, text: str) -> list[int]:
        """Token ids of a prompt text; a chat template already carries its special tokens."""
        return self.tokenizer(text, add_special_tokens=not self.use_chat)["input_ids"]

    def pad_for_generation(self, batch: list[list[int]]):
        """A padded batch on CPU; causal rows padded on the left, so every row's new tokens start at the same column."""
        side = "left" if self.kind == "causal" else "right"
        return self.tokenizer.pad({"input_ids": batch}, padding=True, padding_side=side, return_tensors="pt")
