"""Sweep results: leaderboard.csv/.md, every trial's metric curve, and the best adapter with its lineage.

Every trial is listed, failed and early-stopped ones included, with the reason.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import ExperimentAnalysis
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from jobs import adapter, report, storage
from jobs.config import RunConfig, as_json, dump_config
from tune.space import planned_steps, trial_config

STATUS = {
    "TERMINATED": "completed",
    "ERROR": "failed",
    "PENDING": "not started",
    "PAUSED": "paused",
    "RUNNING": "interrupted",
}


@dataclass
class TrialRow:
    trial_id: str
    status: str
    params: dict[str, Any]
    best: float | None = None
    best_step: int | None = None
    steps_run: int = 0
    planned_steps: int = 0
    wall_s: float = 0.0
    attempts: int = 1
    error: str = ""
    checkpoint: str | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    curve_loss: list[tuple[int, float]] = field(default_factory=list)


def _last_error_line(trial) -> str:
    if trial.error_file and Path(trial.error_file).exists():
        lines = [line.strip() for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""
    return ""


def collect(
    experiment_dir: Path, run: RunConfig, base: dict[str, Any], targets: dict[str, Any], n_train: int
) -> list[TrialRow]:
    """One row per trial, best first (failed and never-reporting trials last)."""
    analysis = ExperimentAnalysis(str(experiment_dir))
    metric = run.tune.metric
    sign = 1 if run.tune.resolved_mode() == "min" else -1  # sort keys: smaller is better
    rows = []
    for trial in analysis.trials:
        frame = analysis.trial_dataframes.get(trial.trial_id)
        reports = frame.to_dict("records") if frame is not None and len(frame) else []
        scored = [r for r in reports if r.get(metric) == r.get(metric)]  # NaN != NaN
        row = TrialRow(
            trial_id=trial.trial_id,
            status=STATUS.get(trial.status, trial.status.lower()),
            params=dict(trial.config),
            planned_steps=planned_steps(trial_config(base, trial.config, targets, run.tune.lora_alpha_ratio), n_train),
            steps_run=int(max((r["step"] for r in reports), default=0)),
            wall_s=round(float(reports[-1]["time_total_s"]), 1) if reports else 0.0,
            attempts=trial.num_failures if trial.status == "ERROR" else 1 + trial.num_failures,
            error=_last_error_line(trial) if trial.status == "ERROR" else "",
            curve=[(int(r["step"]), float(r[metric])) for r in scored],
            curve_loss=[
                (int(r["step"]), float(r["eval_loss"])) for r in reports if r.get("eval_loss") == r.get("eval_loss")
            ],
        )
        if row.status == "completed" and row.steps_run < row.planned_steps:
            row.status = "stopped early"
        if scored:
            best = min(scored, key=lambda r: (sign * r[metric], r["step"]))  # earliest step on ties
            row.best, row.best_step, row.checkpoint = (
                float(best[metric]),
                int(best["step"]),
                best.get(CHECKPOINT_PATH_KEY),
            )
            row.best_metrics = {
                k: v for k, v in best.items() if k.startswith("eval_") or k in ("step", "epoch", "loss")
            }
        rows.append(row)
    return sorted(rows, key=lambda r: (r.best is None, sign * (r.best or 0.0)))


def _param_text(value: Any) -> str:
    return report.fmt(value) if not isinstance(value, str) else value


def write_csv(rows: list[TrialRow], path: Path, metric: str) -> None:
    keys = sorted({k for r in rows for k in r.params})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "rank",
                "trial_id",
                "status",
                *keys,
                f"best_{metric}",
                "best_step",
                "steps_run",
                "planned_steps",
                "wall_s",
                "attempts",
                "error",
            ]
        )
        for rank, r in enumerate(rows, 1):
            writer.writerow(
                [
                    rank,
                    r.trial_id,
                    r.status,
                    *(r.params.get(k, "") for k in keys),
                    "" if r.best is None else r.best,
                    r.best_step or "",
                    r.steps_run,
                    r.planned_steps,
                    r.wall_s,
                    r.attempts,
                    r.error,
                ]
            )


def plot_curves(rows: list[TrialRow], path: Path, metric: str) -> None:
    panels = [(metric, "curve")] + ([("eval_loss", "curve_loss")] if metric != "eval_loss" else [])
    fig, axes = report.plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (label, attr) in zip(axes[0], panels):
        for r in rows:
            points = getattr(r, attr)
            if points:
                ax.plot(
                    *zip(*points),
                    marker="o",
                    markersize=3,
                    linestyle="--" if r.status != "completed" else "-",
                    label=f"{r.trial_id} ({r.status})",
                )
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per trial (dashed: stopped early or failed)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    report.plt.close(fig)


def write_markdown(rows: list[TrialRow], path: Path, run: RunConfig, summary: dict[str, Any]) -> str:
    """leaderboard.md; returns its head (title, totals, the table, failed trials): what the CLI prints."""
    metric = run.tune.metric
    keys = sorted({k for r in rows for k in r.params})
    header = ["#", "trial", "status", *keys, f"best {metric}", "at step", "steps run", "wall s", "attempts"]
    lines = [
        f"# Sweep leaderboard: {Path(run.tune.output_dir).name}",
        "",
        f"Metric **{metric}** ({run.tune.resolved_mode()}), search **{run.tune.search_alg}**, scheduler "
        f"**{run.tune.scheduler}**, "
        f"{summary['trials']} trials, {summary['trial_steps']} trial-steps in all, {summary['wall_s']} s wall time.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for rank, r in enumerate(rows, 1):
        cells = [
            rank,
            r.trial_id,
            r.status,
            *(_param_text(r.params.get(k, "")) for k in keys),
            report.fmt(r.best),
            r.best_step or "",
            f"{r.steps_run}/{r.planned_steps}",
            r.wall_s,
            r.attempts,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    failed = [r for r in rows if r.error]
    if failed:
        lines += ["", "## Failed trials", ""] + [
            f"- {r.trial_id} after {r.attempts} attempt(s): `{r.error}`" for r in failed
        ]
    head = "\n".join(lines) + "\n"
    lines += ["", "## Metric curves", "", "![curves](curves.png)", ""]
    best = summary.get("best")
    if best:
        lines += [
            "## Best trial",
            "",
            f"{best['trial_id']}: {metric} = {report.fmt(best['metrics'][metric])} at step {best['step']}. "
            f"Adapter: `best/adapter`, lineage: `best/lineage.json`, resolved config: `best/config.yaml`.",
            "",
            "```",
            f"lorafleet eval --config {path.parent / 'best' / 'config.yaml'} --adapter "
            f"{path.parent / 'best' / 'adapter'}",
            "```",
        ]
    path.write_text("\n".join(lines) + "\n")
    return head


def export_best(
    rows: list[TrialRow], sweep_dir: Path, run: RunConfig, base: dict[str, Any], targets: dict[str, Any]
) -> dict[str, Any] | None:
    """Copy the best trial's best checkpoint adapter to best/adapter, with lineage.json and config.yaml."""
    best = next((r for r in rows if r.best is not None and r.checkpoint), None)
    if best is None:
        return None
    best_dir = sweep_dir / "best"
    with storage.checkpoint_dir(best.checkpoint, run.ray.storage_path) as checkpoint:
        adapter.install_from_checkpoint(checkpoint, best_dir / "adapter")
    trial_run = trial_config(base, best.params, targets, run.tune.lora_alpha_ratio)
    (best_dir / "config.yaml").write_text(dump_config(trial_run))
    lineage = {
        "trial_id": best.trial_id,
        "step": best.best_step,
        "params": best.params,
        "metrics": best.best_metrics,
        "checkpoint": best.checkpoint,
        "sweep_dir": str(sweep_dir),
        "config": as_json(trial_run, exclude={"serve": {"api_key"}}),  # as config.yaml beside it
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (best_dir / "lineage.json").write_text(json.dumps(lineage, indent=2, default=str))
    return lineage


def rows_as_dicts(rows: list[TrialRow]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(r).items() if k not in ("curve", "curve_loss", "best_metrics")} for r in rows]
