"""The evaluation job: the base model and the adapter on the same examples, side by side.

    lorafleet eval --config configs/squad-smollm2.yaml --adapter runs/squad-smollm2/adapter --predictions preds.jsonl
    lorafleet eval --config configs/squad-smollm2.yaml --baseline

Every example counts: a generation that fails or comes back empty scores 0 and is listed
with its reason. Outputs: eval.json, eval.md, eval.png and, on request, a predictions file.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import DataCollatorForSeq2Seq

from jobs import devices
from jobs.config import RunConfig
from jobs.data import encode, generation_prompt, held_out_examples
from jobs.generate import Generation, generate
from jobs.metrics import aggregate, metric_names, score
from jobs.model import attach_adapter, load_base
from jobs.prompting import Prompting
from jobs.report import fmt, plot_bars

SHOWN_PER_MODEL = ("base", "adapter")


@dataclass
class ModelResult:
    label: str
    generations: list[Generation]
    per_example: list[dict[str, float]]
    metrics: dict[str, float]
    failures: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class EvalOutcome:
    results: dict[str, ModelResult]  # "base" and/or "adapter"
    report: Path  # eval.md
    summary_md: str  # its head: what was evaluated and the metrics side by side, for the CLI to print


def json_schema(run: RunConfig) -> dict[str, Any] | None:
    schema = run.eval.json_schema
    return yaml.safe_load(Path(schema).read_text()) if isinstance(schema, str) else schema


def loss_and_perplexity(
    model, prompting: Prompting, examples: list[dict[str, Any]], run: RunConfig
) -> dict[str, float]:
    """Token-weighted mean loss over the targets (prompts masked, as in training)."""
    collate = DataCollatorForSeq2Seq(prompting.tokenizer, label_pad_token_id=-100)
    seq2seq = prompting.kind == "seq2seq"
    encoded = [
        {k: v for k, v in encode(e, prompting, run.data).items() if k in ("input_ids", "attention_mask", "labels")}
        for e in examples
    ]
    encoded = [e for e in encoded if e["input_ids"]]  # a conversation the template cannot render has no tokens
    total_loss, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), run.eval.batch_size):
            batch = collate(encoded[start : start + run.eval.batch_size]).to(model.device)
            logits = model(
                **{k: v for k, v in batch.items() if k != "labels"}, **({"labels": batch["labels"]} if seq2seq else {})
            ).logits
            labels = batch["labels"] if seq2seq else batch["labels"][:, 1:]
            logits = logits if seq2seq else logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_loss += float(loss)
            total_tokens += int((labels != -100).sum())
    mean = total_loss / max(total_tokens, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50))}


def task_metrics(
    run: RunConfig, model, prompting: Prompting, examples: list[dict[str, Any]], desc: str
) -> tuple[list[Generation], list[dict[str, float]], dict[str, float]]:
    """Generate for every example and score it; failures count as 0 and are counted."""
    schema = json_schema(run)
    generations = generate(model, prompting, [generation_prompt(e) for e in examples], run.data, run.eval, desc=desc)
    per_example = [
        score(g.text, e["references"], run.eval.metrics, schema) for g, e in zip(generations, examples, strict=True)
    ]
    metrics = aggregate(per_example, metric_names(run.eval.metrics, schema))
    metrics["failed_generations"] = sum(g.error is not None for g in generations)
    return generations, per_example, metrics


def evaluate_model(
    label: str, model, prompting: Prompting, examples: list[dict[str, Any]], run: RunConfig
) -> ModelResult:
    started = time.time()
    generations, per_example, metrics = task_metrics(run, model, prompting, examples, desc=f"Generating ({label})")
    metrics = {**loss_and_perplexity(model, prompting, examples, run), **metrics}
    failures = Counter(g.error for g in generations if g.error is not None)
    return ModelResult(label, generations, per_example, metrics, dict(failures), round(time.time() - started, 1))


def run_eval(
    run: RunConfig, adapter: Path | None, with_base: bool, output_dir: Path, predictions: Path | None = None
) -> EvalOutcome:
    """The base model (with_base) then the adapter, on one loaded base model; writes the reports."""
    examples = held_out_examples(run)
    device = devices.local_device()
    prompting = Prompting.load(run.model)
    model = load_base(run, device, prompting.kind)
    results: dict[str, ModelResult] = {}
    if with_base:
        results["base"] = evaluate_model("base", model, prompting, examples, run)
    if adapter is not None:
        results["adapter"] = evaluate_model("adapter", attach_adapter(model, adapter), prompting, examples, run)
    output_dir.mkdir(parents=True, exist_ok=True)
    head = write_reports(output_dir, run, examples, results, adapter)
    if predictions is not None:
        write_predictions(predictions, examples, results)
    return EvalOutcome(results=results, report=output_dir / "eval.md", summary_md=head)


def write_predictions(path: Path, examples: list[dict[str, Any]], results: dict[str, ModelResult]) -> None:
    primary = results.get("adapter") or results["base"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for i, example in enumerate(examples):
            row = {
                "id": example["id"],
                "input": example["prompt"],
                "prediction": primary.generations[i].text,
                "references": example["references"],
                **({"messages": generation_prompt(example)} if example.get("conversation") else {}),
                "model": primary.label,
                "error": primary.generations[i].error,
                "metrics": primary.per_example[i],
            }
            if "adapter" in results and "base" in results:
                row["base_prediction"], row["base_metrics"] = (
                    results["base"].generations[i].text,
                    results["base"].per_example[i],
                )
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _metrics_table(results: dict[str, ModelResult]) -> str:
    labels = [label for label in SHOWN_PER_MODEL if label in results]
    names = list(next(iter(results.values())).metrics)
    both = len(labels) == 2
    header = "| metric | " + " | ".join(labels) + (" | delta |" if both else " |")
    lines = [header, "| --- " * (len(labels) + 1 + both) + "|"]
    for name in names:
        values = [results[label].metrics[name] for label in labels]
        delta = f" | {values[1] - values[0]:+.4g}" if both else ""
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in values) + delta + " |")
    return "\n".join(lines)


def _failures(results: dict[str, ModelResult], total: int) -> str:
    lines = []
    for label, result in results.items():
        failed = result.metrics["failed_generations"]
        reasons = "; ".join(f"{reason} x{count}" for reason, count in result.failures.items()) or "none"
        lines.append(f"- {label}: {failed} of {total} generations failed (scored 0, not left out). Reasons: {reasons}")
    return "\n".join(lines)


def _samples(examples: list[dict[str, Any]], results: dict[str, ModelResult], count: int) -> str:
    blocks = []
    for i, example in enumerate(examples[:count]):
        parts = [
            f"### Sample {i + 1} (`{example['id']}`)",
            "**Input:**",
            f"```\n{example['prompt']}\n```",
            "**Expected:**",
            f"```\n{example['target']}\n```",
        ]
        for label, result in results.items():
            g = result.generations[i]
            parts += [
                f"**{label.capitalize()}:**",
                f"```\n{g.text if g.text is not None else '(failed: ' + str(g.error) + ')'}\n```",
            ]
        blocks.append("\n\n".join(parts))
    return "\n\n".join(blocks)


def write_reports(
    output_dir: Path,
    run: RunConfig,
    examples: list[dict[str, Any]],
    results: dict[str, ModelResult],
    adapter: Path | None,
) -> str:
    """eval.json, eval.png and eval.md; returns the head of eval.md (what was evaluated, the metrics): what the CLI
    prints.
    """
    source = (
        run.data.eval_path or f"{run.data.path} (held-out {run.data.validation_fraction:.0%}, seed {run.data.seed})"
    )
    summary = {
        "model": run.model.name,
        "adapter": str(adapter) if adapter else None,
        "eval_set": source,
        "examples": len(examples),
        "generation": run.eval.model_dump(mode="json"),
        "results": {
            label: {"metrics": r.metrics, "failures": r.failures, "seconds": r.seconds} for label, r in results.items()
        },
    }
    (output_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    charted = {
        label: {n: v for n, v in r.metrics.items() if n not in ("failed_generations", "perplexity")}
        for label, r in results.items()
    }
    plot_bars(charted, output_dir / "eval.png", "Evaluation: base vs adapter")
    sections = [
        f"# Evaluation: {run.model.name}" + (f" + `{adapter}`" if adapter else ""),
        f"Eval set: {source}, {len(examples)} examples. Generation: max_new_tokens={run.eval.max_new_tokens}, "
        f"{'sampling' if run.eval.do_sample else 'beam search' if run.eval.num_beams > 1 else 'greedy'}, "
        f"stop={run.eval.stop}.",
        "## Metrics\n\n" + _metrics_table(results) + "\n\n![metrics](eval.png)",
        "## Failed generations\n\n" + _failures(results, len(examples)),
        "## Timings\n\n" + "\n".join(f"- {label}: {r.seconds} s" for label, r in results.items()),
        "## Sample predictions\n\n" + _samples(examples, results, run.eval.report_samples),
    ]
    (output_dir / "eval.md").write_text("\n\n".join(sections) + "\n")
    return "\n\n".join(sections[:3]) + "\n"
