"""The run report: metrics summary, `report.md` and `loss.png` under the output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from jobs.config import RunConfig  # noqa: E402


def _series(log_history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in log_history if key in entry]


def summarize(log_history: list[dict[str, Any]], fit_seconds: float, total_seconds: float) -> dict[str, Any]:
    train_loss, eval_loss = _series(log_history, "loss"), _series(log_history, "eval_loss")
    final = next((e for e in reversed(log_history) if "train_runtime" in e), {})
    counts = next((e for e in log_history if "trainable_parameters" in e), {})
    tokens = max((e.get("num_input_tokens_seen", 0) for e in log_history), default=0)
    runtime = final.get("train_runtime")
    best = min(eval_loss, key=lambda p: p[1]) if eval_loss else None
    return {
        "steps": max((e["step"] for e in log_history), default=0),
        "first_train_loss": train_loss[0][1] if train_loss else None,
        "final_train_loss": train_loss[-1][1] if train_loss else None,
        "first_eval_loss": eval_loss[0][1] if eval_loss else None,
        "final_eval_loss": eval_loss[-1][1] if eval_loss else None,
        "best_eval_loss": best[1] if best else None,
        "best_eval_step": best[0] if best else None,
        "train_runtime_s": runtime,
        "train_samples_per_second": final.get("train_samples_per_second"),
        "tokens_seen": tokens,
        "train_tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "ray_fit_s": round(fit_seconds, 1),
        "job_total_s": round(total_seconds, 1),
        "resumed_from_steps": [e["resumed_from_step"] for e in log_history if "resumed_from_step" in e],
        "worker_nodes": [e["worker_nodes"] for e in log_history if "worker_nodes" in e],  # one list per attempt
        "trainable_parameters": counts.get("trainable_parameters"),
        "total_parameters": counts.get("total_parameters"),
    }


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = _series(log_history, key)
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss per step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(series: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """One group of bars per metric, one bar per series (e.g. base vs adapter)."""
    names = list(next(iter(series.values())))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    width = 0.8 / len(series)
    for offset, (label, values) in enumerate(series.items()):
        ax.bar([i + offset * width for i in range(len(names))], [values[n] for n in names], width, label=label)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))], names)
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("Parameter", "Value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def _loss_table(log_history: list[dict[str, Any]]) -> str:
    steps: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "loss" in entry or "eval_loss" in entry:
            row = steps.setdefault(entry["step"], {"epoch": entry.get("epoch")})
            row.update({k: entry[k] for k in ("loss", "eval_loss") if k in entry})
    lines = ["| Step | Epoch | Training loss | Validation loss |", "| --- | --- | --- | --- |"]
    lines += [f"| {s} | {fmt(r.get('epoch'))} | {fmt(r.get('loss'))} | {fmt(r.get('eval_loss'))} |" for s, r in sorted(steps.items())]
    return "\n".join(lines)


def _data_section(data: dict[str, Any]) -> str:
    rows = [("Source", data["source"]), ("Format", data["format"]), ("Read and tokenized", "on the cluster (Ray Data), streamed to the workers" if data.get("loader") == "ray_data" else "in the driver"), ("Rows read", data["rows_read"]), ("Valid rows", data["rows_valid"]),
            ("Bad rows (skipped)", data["bad_rows"]), ("Left out by data.max_samples", data["rows_left_out_by_max_samples"])]
    for split in ("train", "validation"):
        if split in data:
            s = data[split]
            chat = "too_long_skipped" in s  # conversations: context and trained tokens, turns dropped to fit
            rows += [(f"{split}: examples", s["rows"]),
                     (f"{split}: {'context tokens (no loss)' if chat else 'prompt tokens'} mean / p50 / p95 / max", " / ".join(fmt(s["prompt_tokens"].get(k)) for k in ("mean", "p50", "p95", "max"))),
                     (f"{split}: {'trained tokens' if chat else 'target tokens'} mean / p50 / p95 / max", " / ".join(fmt(s["target_tokens"].get(k)) for k in ("mean", "p50", "p95", "max"))),
                     (f"{split}: {'conversations with oldest turns dropped' if chat else 'truncated examples'}", f"{s['truncated']} ({100 * s['truncated_share']:.1f}%)")]
            if chat:
                rows += [(f"{split}: turns dropped (data.truncation)", s["dropped_turns"]),
                         (f"{split}: skipped, longer than data.max_length", s["too_long_skipped"]),
                         (f"{split}: skipped, chat template problems", s["template_problems_skipped"])]
            if "token_figures_from_rows" in s:
                rows += [(f"{split}: token figures", f"from its first {s['token_figures_from_rows']:,} rows; the rest were tokenized as the workers read them")]
    text = _table(rows)
    if data["bad_row_details"]:
        text += "\n\nBad rows (first {}):\n\n".format(len(data["bad_row_details"])) + "\n".join(f"- {d}" for d in data["bad_row_details"])
    return text


def write(output_dir: Path, run: RunConfig, metrics: dict[str, Any], data: dict[str, Any], log_history: list[dict[str, Any]]) -> Path:
    plot_loss(log_history, output_dir / "loss.png")
    t, lora, q = run.training, run.lora, run.quantization
    trainable, total = metrics.get("trainable_parameters"), metrics.get("total_parameters")
    share = f" ({100 * trainable / total:.2f}% of {total:,})" if trainable and total else ""
    sections = [
        f"# Training report: {Path(run.training.output_dir).name}",
        "## Model\n\n" + _table([("Base model", run.model.name), ("Architecture", metrics.get("kind")),
                                 ("Fine-tuning method", "QLoRA" if q.mode == "4bit" else f"LoRA ({q.mode} base)" if q.mode != "none" else "LoRA"),
                                 ("Quantization", f"{q.mode} {q.quant_type if q.mode == '4bit' else ''} double-quant={q.double_quant if q.mode == '4bit' else '-'}"),
                                 ("Chat template", run.model.chat_template)]),
        "## LoRA\n\n" + _table([("Rank (r)", lora.r), ("Alpha", lora.alpha), ("Dropout", lora.dropout), ("Target modules", lora.target_modules),
                               ("Bias", lora.bias), ("Trainable parameters", f"{trainable:,}{share}" if trainable else None)]),
        "## Hyperparameters\n\n" + _table([("Epochs", t.num_epochs if t.max_steps < 0 else "-"), ("Max steps", t.max_steps if t.max_steps > 0 else "-"),
                                          ("Batch size per worker", t.batch_size), ("Gradient accumulation", t.gradient_accumulation_steps),
                                          ("Workers", run.ray.num_workers), ("Effective batch size", t.batch_size * t.gradient_accumulation_steps * run.ray.num_workers),
                                          ("Learning rate", t.learning_rate), ("LR scheduler", t.lr_scheduler), ("Warmup ratio", t.warmup_ratio),
                                          ("Optimizer", t.optimizer), ("Weight decay", t.weight_decay), ("Max grad norm", t.max_grad_norm),
                                          ("Precision", t.precision), ("Gradient checkpointing", t.gradient_checkpointing), ("Seed", t.seed)]),
        "## Data\n\n" + _data_section(data),
        "## Loss curve\n\n![loss](loss.png)\n\n" + _loss_table(log_history),
        "## Key metrics\n\n" + _table([("Steps", metrics["steps"]), ("Ray nodes the workers ran on (per attempt)", ", ".join(str(len(set(n))) for n in metrics.get("worker_nodes", [])) or None), ("First / final training loss", f"{fmt(metrics['first_train_loss'])} -> {fmt(metrics['final_train_loss'])}"),
                                       ("First / final validation loss", f"{fmt(metrics['first_eval_loss'])} -> {fmt(metrics['final_eval_loss'])}"),
                                       ("Best validation loss (step)", f"{fmt(metrics['best_eval_loss'])} ({fmt(metrics['best_eval_step'])})"),
                                       ("Adapter exported from step", metrics.get("chosen_step")),
                                       ("Resumed after a failure from step", ", ".join(map(str, metrics["resumed_from_steps"])) or "never")]),
        "## Timings\n\n" + _table([("Trainer runtime (s)", metrics["train_runtime_s"]), ("Ray fit, incl. worker start (s)", metrics["ray_fit_s"]),
                                   ("Whole job (s)", metrics["job_total_s"]), ("Samples per second", metrics["train_samples_per_second"]),
                                   ("Trained tokens (non-padding)", metrics["tokens_seen"]), ("Trained tokens per second", metrics["train_tokens_per_second"])]),
    ]
    path = output_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path
