"""GPU acceptance: lorafleet's own GPU paths on a CUDA machine, one table row per check, pass or fail, with figures.

    python bench/gpu_check.py              # on a CUDA machine: make gpu-check (docs/guides/gpu-check.md)
    python bench/gpu_check.py --dry-run    # the same checks on CPU with the tiny model; GPU-only rows skipped by name

Models are built from the configs below with random weights (no download): a tiny Llama for correctness and
a Llama of about 1B parameters for speed (the tiny one again in a dry run). Every check runs lorafleet's code
(`jobs.model`, `jobs.train`'s Trainer, `serve.engine.Engine`, `serve.choice`), not a copy of it:
- qlora-train: QLoRA steps (4-bit NF4 base, precision and compute dtype as `auto` resolves them, gradient
  checkpointing): the loss falls and every adapted module's LoRA matrices get a nonzero gradient;
- adapter-reload: the saved adapter, loaded again by `jobs.model.load_adapter`, gives the same logits;
- serve-two-adapters: the HF engine generates for two adapters in one batch, each row as its adapter alone;
- packing-<attention>: a padding-free batch has the padded batch's loss; tokens/s of each;
- speed-1b: lorafleet's Trainer against a plain HF Trainer + PEFT script, same model, batches and settings:
  trained tokens/s and peak GPU memory (target: within 10% of the plain script on both);
- ray-train: `lorafleet train` through Ray Train with one worker (`ray.use_gpu: true` on a GPU);
- serve-auto-vllm: `serve.engine: auto` picks vLLM for GPU replicas (GPU only, and only where vLLM is installed).

On a GPU the figures go to bench/results/gpu_check.json (the docs' GPU check page); a dry run writes none.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from results import markdown_row, target, write_result  # noqa: E402  (bench/ is this script's folder)

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
ONE_B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4}
SPEED_TOLERANCE = 0.10  # lorafleet's Trainer may cost at most this share over the plain script, in time and memory
# Same weights, same kernels: reloaded logits may differ only by a rounding step of the compute dtype (bf16 has
# 8 mantissa bits: 0.4% of a value), measured against the largest logit.
RELOAD_TOLERANCE = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}
# Padded and packed batches sum the same per-token losses in another order and through other attention kernels:
# a few rounding steps of the compute dtype apart.
PACKING_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


@dataclass
class Row:
    check: str
    status: str  # pass, FAIL, skip
    figures: str
    seconds: float = 0.0


@dataclass
class Context:
    """What the checks share: the device, the built models, the trained adapter."""

    dry_run: bool
    work: Path
    device: torch.device
    tiny: Path
    big: Path
    state: dict = field(default_factory=dict)

    def run(self, model: Path, *overrides: str):
        from jobs.config import load_config

        gpu = [] if self.dry_run else ["ray.use_gpu=true"]
        return load_config(None, [f"model.name={model}", "data.path=demo", "data.demo_rows=400", "lora.r=8",
                                  "training.logging_steps=1", "training.learning_rate=3e-3", "training.eval_steps=1000",
                                  "data.validation_fraction=0", *gpu, *overrides])


def build_model(layers: dict, folder: Path) -> Path:
    """A random Llama with the tests' offline word-level tokenizer."""
    from tests.tiny_models import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tokenizer("causal")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **layers)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    if layers is ONE_B:
        model = model.to(torch.bfloat16)  # 2.2 GB on disk instead of 4.4; the 4-bit load quantizes it either way
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _train_set(run):
    from jobs.data import prepare
    from jobs.prompting import Prompting

    prompting = Prompting.load(run.model)
    return prompting, prepare(run, prompting).whole_sets()[0]


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _gib(value: float | None) -> str:
    return "n/a on CPU" if value is None else f"{value:.2f} GiB"


def _tokens_per_s(trainer) -> float:
    return trainer.state.num_input_tokens_seen / trainer.state.log_history[-1]["train_runtime"]


def _lora_modules_without_gradient(trainer) -> tuple[int, list[str]]:
    model = trainer.model
    model.zero_grad()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.training_step(model, batch)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    modules = {n.split(".lora_")[0] for n in params}
    dead = {n.split(".lora_")[0] for n, p in params.items() if p.grad is None or not p.grad.abs().sum().item()}
    return len(modules), sorted(dead)


def check_training(ctx: Context) -> tuple[bool, str]:
    from jobs.model import compute_dtype, load_for_training
    from jobs.train import hf_trainer

    run = ctx.run(ctx.tiny, "training.max_steps=16", "training.gradient_checkpointing=true", "training.batch_size=8")
    prompting, train_set = _train_set(run)
    model = load_for_training(run, ctx.device, prompting.kind)
    trainer = hf_trainer(run, model, prompting, str(ctx.work / "train"), train_set)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    modules, dead = _lora_modules_without_gradient(trainer)
    model.save_pretrained(ctx.work / "adapter")
    ctx.state.update(run=run, prompting=prompting, model=model.eval(), train_set=train_set)
    precision = "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"
    falls = sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    return falls and not dead, (
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; LoRA gradient nonzero on {modules - len(dead)}/{modules} modules"
        f"{' (none on ' + ', '.join(dead[:3]) + ')' if dead else ''}; precision {precision}, 4-bit compute "
        f"{str(compute_dtype(run, ctx.device)).removeprefix('torch.')}"
    )


def _batch(ctx: Context, run, size: int) -> dict:
    """The first `size` training rows, collated as `run` says (padded, or padding-free), on the device."""
    from jobs.train import collator

    rows = [ctx.state["train_set"][i] for i in range(size)]
    return {k: v.to(ctx.device) for k, v in collator(run, ctx.state["prompting"])(rows).items()}


def check_reload(ctx: Context) -> tuple[bool, str]:
    from jobs.model import compute_dtype, load_adapter

    run = ctx.state["run"]
    reloaded = load_adapter(run, ctx.work / "adapter", ctx.device, "causal").eval()
    batch = _batch(ctx, run, 8)
    with torch.no_grad():
        trained = ctx.state["model"](**batch).logits.float()
        again = reloaded(**batch).logits.float()
    gap = ((trained - again).abs().max() / trained.abs().max()).item()
    same_argmax = (trained.argmax(-1) == again.argmax(-1)).float().mean().item()
    tolerance = RELOAD_TOLERANCE[compute_dtype(run, ctx.device)]
    return gap <= tolerance, f"largest logit gap {gap:.1e} of the largest logit (tolerance {tolerance:.0e}); same argmax {same_argmax:.1%}"


def _second_adapter(ctx: Context) -> Path:
    """The trained adapter with its B matrices negated: same shape, other outputs."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = ctx.work / "adapter-b"
    shutil.copytree(ctx.work / "adapter", folder, dirs_exist_ok=True)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: -v if "lora_B" in k else v for k, v in tensors.items()}, weights)
    return folder


async def _texts(engine, group: list) -> list[str]:
    texts = [""] * len(group)
    async for deltas in engine._run_group(group):
        for row, delta in enumerate(deltas):
            texts[row] += delta.text if delta is not None else ""
    return texts


async def _serve_rows(engine, prompt_ids: list[int]) -> dict:
    from serve.generation import GenRequest

    requests = {name: GenRequest(prompt_ids=prompt_ids, max_tokens=16, adapter=name, temperature=0.0) for name in ("a", "b")}
    alone = {name: (await _texts(engine, [request]))[0] for name, request in requests.items()}
    sizes: list[int] = []
    generate = engine.model.generate
    engine.model.generate = lambda **kw: (sizes.append(kw["input_ids"].shape[0]), generate(**kw))[1]
    started = time.perf_counter()
    together = await _texts(engine, [requests[name] for name in ("a", "b") * 4])
    seconds = time.perf_counter() - started
    tokens = sum(len(engine.prompting.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in together)
    return {"alone": alone, "together": together, "sizes": sizes, "tokens_per_s": tokens / seconds}


def check_serving(ctx: Context) -> tuple[bool, str]:
    """One batch of the HF engine (`Engine._run_group`: the adapters attached, one `generate` with per-row adapters).
    Serve's own batching queue and adapter multiplexer need a running replica: tests/test_serve_ray.py covers them."""
    from jobs.config import as_json
    from serve.engine import Engine

    resources = "{CPU: 2}" if ctx.dry_run else "{CPU: 2, GPU: 1}"
    run = ctx.run(ctx.tiny, f"serve.replica_resources={resources}", "serve.engine=hf", "serve.max_batch_size=8",
                  f"serve.adapters={{a: {ctx.work / 'adapter'}, b: {_second_adapter(ctx)}}}")
    engine = Engine.func_or_class(as_json(run))  # what Serve hands each replica
    prompt_ids = engine.prompting.ids("Question: what is the first output")
    seen = asyncio.run(_serve_rows(engine, prompt_ids))
    expected = [seen["alone"][name] for name in ("a", "b") * 4]
    mixed = seen["sizes"] == [8]
    differ = seen["alone"]["a"] != seen["alone"]["b"]
    passed = seen["together"] == expected and mixed and differ
    return passed, (
        f"device {engine.device}; generate calls' batch sizes {seen['sizes']}; every row as its adapter alone: "
        f"{seen['together'] == expected}; the adapters' answers differ: {differ}; {seen['tokens_per_s']:.0f} tokens/s"
    )


def _attentions(ctx: Context) -> list[str]:
    found = ["sdpa"]
    if not ctx.dry_run and importlib.util.find_spec("flash_attn"):
        found.append("flash_attention_2")
    return found


def _loss_and_speed(model, batch, steps: int = 5) -> tuple[float, float]:
    tokens = int((batch["labels"] != -100).sum())
    dtype = torch.bfloat16 if batch["input_ids"].is_cuda and torch.cuda.is_bf16_supported() else None
    with torch.autocast(batch["input_ids"].device.type, dtype=dtype, enabled=dtype is not None):
        loss = model(**batch).loss.item()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            model(**batch).loss.backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return loss, tokens * steps / (time.perf_counter() - started)


def check_packing(ctx: Context, attention: str) -> tuple[bool, str]:
    from jobs.model import compute_dtype

    run = ctx.state["run"]
    model = ctx.state["model"]  # eval mode: no dropout, so both batches see the same function
    model.set_attn_implementation(attention)
    figures = {}
    for packing in ("none", "padding_free"):
        packed_run = run.model_copy(update={"training": run.training.model_copy(update={"packing": packing})})
        figures[packing] = _loss_and_speed(model, _batch(ctx, packed_run, 16))
    model.set_attn_implementation("sdpa")
    (padded, padded_speed), (packed, packed_speed) = figures["none"], figures["padding_free"]
    gap = abs(packed - padded) / abs(padded)
    tolerance = PACKING_TOLERANCE[compute_dtype(run, ctx.device)]
    return gap <= tolerance, (
        f"loss padded {padded:.4f}, padding-free {packed:.4f} (gap {gap:.1e}, tolerance {tolerance:.0e}); "
        f"{padded_speed:.0f} vs {packed_speed:.0f} trained tokens/s"
    )


def _plain_trainer(run, train_set, prompting, output_dir: str):
    """What a user writes without lorafleet: HF Trainer + PEFT + bitsandbytes, the same settings."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    q = run.quantization
    model = AutoModelForCausalLM.from_pretrained(run.model.name, device_map={"": 0} if torch.cuda.is_available() else None,
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                                                                        bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=dtype))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=run.lora.r, lora_alpha=run.lora.alpha, lora_dropout=run.lora.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    t = run.training
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=t.batch_size, max_steps=t.max_steps, learning_rate=t.learning_rate,
                             bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", seed=t.seed,
                             include_num_input_tokens_seen="non_padding", report_to="none")
    return Trainer(model=model, args=args, train_dataset=train_set, data_collator=DataCollatorForSeq2Seq(prompting.tokenizer, label_pad_token_id=-100))


def _timed_training(make_trainer: Callable) -> tuple[float, float | None]:
    gc.collect()  # the previous trainer's model must not count in this one's peak memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = make_trainer()
    trainer.train()
    figures = (_tokens_per_s(trainer), _peak_gib())
    del trainer
    return figures


def check_speed(ctx: Context) -> tuple[bool, str]:
    from jobs.model import load_for_training
    from jobs.train import hf_trainer

    steps = 6 if ctx.dry_run else 30
    run = ctx.run(ctx.big, f"training.max_steps={steps}", "training.batch_size=8", "training.gradient_checkpointing=true")
    prompting, train_set = _train_set(run)
    ours = _timed_training(lambda: hf_trainer(run, load_for_training(run, ctx.device, "causal"), prompting, str(ctx.work / "speed"), train_set))
    plain = _timed_training(lambda: _plain_trainer(run, train_set, prompting, str(ctx.work / "plain")))
    ratio = ours[0] / plain[0]
    ctx.state["speed"] = {"lorafleet_tokens_per_s": ours[0], "plain_tokens_per_s": plain[0], "lorafleet_peak": ours[1], "plain_peak": plain[1]}
    memory_ok = ours[1] is None or ours[1] <= (1 + SPEED_TOLERANCE) * plain[1]
    return (ratio >= 1 - SPEED_TOLERANCE and memory_ok) or ctx.dry_run, (
        f"{ours[0]:.0f} vs plain {plain[0]:.0f} trained tokens/s ({ratio:.2f}x); peak GPU memory {_gib(ours[1])} vs {_gib(plain[1])}"
        + (" (dry run: figures not judged)" if ctx.dry_run else "")
    )


def check_ray_train(ctx: Context) -> tuple[bool | None, str]:
    if importlib.util.find_spec("ray") is None:
        return None, "ray is not installed here (carry it: docs/guides/gpu-check.md)"
    from jobs.train import train

    outcome = train(ctx.run(ctx.tiny, "training.max_steps=10", f"training.output_dir={ctx.work / 'ray-run'}"))
    first, last = outcome.metrics.get("first_train_loss"), outcome.metrics.get("final_train_loss")
    written = (outcome.adapter_dir / "adapter_model.safetensors").is_file()
    return written and last is not None and last < first, (
        f"1 worker, ray.use_gpu={str(not ctx.dry_run).lower()}; train loss {first:.3f} -> {last:.3f}; adapter written: {written}")


def check_auto_vllm(ctx: Context) -> tuple[bool | None, str]:
    if ctx.dry_run:
        return None, "GPU only"
    if importlib.util.find_spec("vllm") is None:
        return None, "vllm is not installed here"
    from serve.choice import choose

    chosen = choose(ctx.run(ctx.tiny, "serve.replica_resources={GPU: 1}", "quantization.mode=none"))
    return chosen.name == "vllm", chosen.line()


def run_check(name: str, check: Callable[[], tuple[bool | None, str]]) -> Row:
    started = time.perf_counter()
    try:
        passed, figures = check()
    except Exception as exc:  # one broken path must not hide the others' rows
        traceback.print_exc()
        passed, figures = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    status = "skip" if passed is None else "pass" if passed else "FAIL"
    row = Row(name, status, figures, time.perf_counter() - started)
    print(f"[gpu-check] {row.check}: {row.status} ({row.seconds:.0f} s) {row.figures}", flush=True)
    return row


def checks(ctx: Context) -> list[tuple[str, Callable]]:
    packing = [(f"packing-{attention}", lambda a=attention: check_packing(ctx, a)) for attention in _attentions(ctx)]
    if ctx.dry_run:
        packing.append(("packing-flash_attention_2", lambda: (None, "GPU only")))
    return [
        ("qlora-train", lambda: check_training(ctx)),
        ("adapter-reload", lambda: check_reload(ctx)),
        ("serve-two-adapters", lambda: check_serving(ctx)),
        *packing,
        ("speed-1b", lambda: check_speed(ctx)),
        ("ray-train", lambda: check_ray_train(ctx)),
        ("serve-auto-vllm", lambda: check_auto_vllm(ctx)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on CPU with the tiny model; GPU-only rows are skipped")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device here; run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    with tempfile.TemporaryDirectory(prefix="lorafleet-gpu-check-") as work:
        work = Path(work)
        tiny = build_model(TINY, work / "tiny")
        big = tiny if args.dry_run else build_model(ONE_B, work / "one-b")
        ctx = Context(args.dry_run, work, device, tiny, big)
        rows = [run_check(name, check) for name, check in checks(ctx)]
    title = f"GPU check on {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() and not args.dry_run else "GPU check, dry run on CPU"
    print(f"\n{title}\n")
    table = [{"check": r.check, "result": r.status, "seconds": f"{r.seconds:.0f}", "figures": r.figures} for r in rows]
    print("| check | result | seconds | figures |\n| --- | --- | ---: | --- |")
    for row in table:
        print(markdown_row(row))
    if not args.dry_run:
        speed = ctx.state.get("speed", {})
        passed = all(r.status != "FAIL" for r in rows)
        ratio = speed["lorafleet_tokens_per_s"] / speed["plain_tokens_per_s"] if speed else 0.0
        write_result("gpu_check", args, table, [
            target("checks failed", sum(r.status == "FAIL" for r in rows), "==", 0),
            target("lorafleet / plain trained tokens/s (1B model)", ratio, ">=", 1 - SPEED_TOLERANCE),
        ], headline=title if passed else None)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
