"""The two CPU kernel paths of bitsandbytes' 4-bit layers, and what keeping one of them costs.

On CPUs with AVX-512 BF16, bitsandbytes 0.50 repacks a Linear4bit's weight at its first forward in
eval mode without grad and then multiplies with a fused kernel. lorafleet turns that off
(`jobs.model.one_4bit_kernel`): the fused kernel has no autograd and rounds differently, so
training after the first evaluation, and eval/Serve after a reload, saw another model. This prints,
for SmolLM2-135M-Instruct 4-bit NF4 with a LoRA (r=16, all-linear), bitsandbytes as shipped against
lorafleet's setting: how far eval-mode logits are from what the training steps compute, the LoRA
matrices whose gradient changes (by more than 1%) once an evaluation has run, and greedy generation
time (what the fused kernel would have saved).

    python bench/cpu_4bit_kernels.py [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
from bitsandbytes.functional import has_avx512bf16  # noqa: E402
from results import markdown_row, write_result  # noqa: E402  (bench/ is this script's folder)

from jobs.config import load_config  # noqa: E402
from jobs.model import load_for_training, load_tokenizer  # noqa: E402

CPU = torch.device("cpu")


def build(run, fused: bool):
    model = load_for_training(run, CPU, "causal")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = fused and has_avx512bf16()  # as shipped: on wherever the CPU has it
    return model


def measure(run, batch, prompt, fused: bool, tokens: int, repeats: int) -> dict:
    model = build(run, fused)
    model.train()
    with torch.no_grad():
        trained = model(**batch).logits  # what the training steps compute (dropout is 0)
    model(**batch).loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch).logits  # the first evaluation: the fused path repacks here
    model.train()
    model(**batch).loss.backward()
    after = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    changed = sum(1 for n, g in before.items() if (after[n] - g).norm() > 0.01 * g.norm())
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(**prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            times.append(time.perf_counter() - started)
    change = ((evaluated - trained).abs().max() / trained.abs().max()).item()
    return {"change": change, "changed": changed, "total": len(before), "generate_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run = load_config(None, ["model.name=smollm2-135m-instruct", "quantization.mode=4bit", "lora.r=16", "lora.target_modules=all-linear", "lora.dropout=0.0"])
    tokenizer = load_tokenizer(run.model)
    texts = ["Question: When is the best time to post on Saturday?\nAnswer: lunchtime", "Context: Notre Dame is a Catholic university.\nAnswer: yes"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    prompt = tokenizer(["Question: When is the best time to post on Saturday?\nAnswer:"], return_tensors="pt")
    print(f"CPU has AVX-512 BF16 (bitsandbytes' check): {has_avx512bf16()}; threads: {torch.get_num_threads()}")
    rows = [("bitsandbytes as shipped (fused kernel after the first eval)", measure(run, batch, prompt, True, args.tokens, args.repeats)),
            ("lorafleet (one kernel: dequantize + matmul)", measure(run, batch, prompt, False, args.tokens, args.repeats))]
    columns = ["4-bit layers", "eval logits vs the training path (max relative difference)", "LoRA matrices whose gradient changed after the first evaluation",
               f"greedy generation, {args.tokens} tokens, median of {args.repeats} (s)"]
    print("\n| " + " | ".join(columns) + " |")
    print("| --- | ---: | ---: | ---: |")
    table = [dict(zip(columns, [label, f"{r['change']:.2e}", f"{r['changed']} of {r['total']}", f"{r['generate_s']:.2f}"], strict=True)) for label, r in rows]
    for row in table:
        print(markdown_row(row))
    shipped, ours = rows[0][1], rows[1][1]
    write_result("cpu_4bit_kernels", args, table, headline=(
        f"lorafleet: {ours['changed']} of {ours['total']} LoRA gradients changed by an evaluation (as shipped: {shipped['changed']}); "
        f"greedy generation {ours['generate_s']:.2f} s against {shipped['generate_s']:.2f} s as shipped"))


if __name__ == "__main__":
    main()
