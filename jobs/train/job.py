"""The training job on the driver: validate config and data before any Ray resource is requested, fit a
`TorchTrainer`, then export the adapter, metrics and run report to `training.output_dir`."""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch

from jobs import adapter, cluster, report, storage, tracking
from jobs.config import ConfigError, RunConfig, as_json, dump_config, problem
from jobs.data import Prepared, prepare
from jobs.prompting import Prompting
from jobs.train.arguments import check_packing, deepspeed_config, training_arguments
from jobs.train.callbacks import FAIL_AT_ENV
from jobs.train.worker import train_loop_per_worker


@dataclass
class TrainOutcome:
    output_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    published: str | None = None  # the copy on ray.storage_path when that is s3:// or gs://

    @property
    def summary_md(self) -> str:
        """What the run did and where its outputs are, for the CLI to print."""
        m = self.metrics
        pairs = (("train_loss", "train loss"), ("eval_loss", "eval loss"))
        losses = [
            f"{label} {m[f'first_{key}']:.4f} -> {m[f'final_{key}']:.4f}"
            for key, label in pairs
            if m[f"first_{key}"] is not None
        ]
        lines = [
            f"done in {m['job_total_s']} s, {m['steps']} steps: {', '.join(losses) or 'no loss logged'}",
            f"adapter: {self.adapter_dir}",
            f"report:  {self.output_dir / 'report.md'}",
            f"metrics: {self.output_dir / 'metrics.json'}",
        ]
        return "\n".join(lines + ([f"copied to {self.published}"] if self.published else []))


def streamed_steps(run: RunConfig, train_rows: int) -> int | None:
    """Optimizer steps over a streamed training set: each worker gets an equal share of the rows, in batches."""
    if run.training.max_steps > 0:
        return None
    per_worker = train_rows // run.ray.num_workers
    if per_worker == 0:
        raise ConfigError(
            [
                problem(
                    "ray.num_workers",
                    run.ray.num_workers,
                    f"more workers than the {train_rows} training rows; use fewer",
                )
            ]
        )
    batches = math.ceil(per_worker / run.training.batch_size)
    return math.ceil(math.ceil(batches / run.training.gradient_accumulation_steps) * run.training.num_epochs)


def fit(
    run: RunConfig,
    data: Prepared,
    prompting: Prompting,
    placement: cluster.RunPlacement | None = None,
    tracked: tracking.Tracking | None = None,
) -> ray.train.Result:
    cluster.connect(run.ray.address)
    run_json = as_json(run)
    # Inlined here: a DeepSpeed file path of the driver's node need not exist on the workers' nodes.
    run_json["training"]["deepspeed"] = deepspeed_config(run.training.deepspeed)
    whole = data.whole_sets()
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        # Each worker loads its own tokenizer; the rest of how prompts are read travels with the config.
        train_loop_config={
            "run": run_json,
            "whole": None if whole is None else ray.put(whole),
            "has_eval": data.has_eval,
            "eval_examples": data.eval_examples[: run.eval.during_training_samples],
            # A streamed set has no length the Trainer can see: the steps come from the counted rows.
            "max_steps": streamed_steps(run, data.train_rows) if whole is None else None,
            "kind": prompting.kind,
            "use_chat": prompting.use_chat,
            "tracking": tracked,
        },
        datasets=data.ray_datasets(),
        # Every worker evaluates the whole held-out set, so eval_loss is the same figure on every rank.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.ray.num_workers,
            use_gpu=run.ray.use_gpu,
            resources_per_worker=run.ray.resources_per_worker,
            placement_strategy=run.ray.placement_strategy,
        ),
        run_config=cluster.train_run_config(
            run, data.has_eval, placement or cluster.RunPlacement(), passed=(FAIL_AT_ENV,)
        ),
    )
    return trainer.fit()


def _chosen_checkpoint(result: ray.train.Result, has_eval: bool) -> ray.train.Checkpoint:
    if has_eval and result.best_checkpoints:
        return result.get_best_checkpoint(metric="eval_loss", mode="min")
    return result.checkpoint


def export(result: ray.train.Result, run: RunConfig, output_dir: Path, has_eval: bool) -> tuple[Path, dict[str, Any]]:
    """Adapter + tokenizer from the chosen checkpoint, and the full log history of the run."""
    chosen = _chosen_checkpoint(result, has_eval)
    adapter_dir = output_dir / "adapter"
    with chosen.as_directory() as path:
        adapter.install_from_checkpoint(Path(path), adapter_dir)
        chosen_state = json.loads((Path(path) / adapter.IN_CHECKPOINT / "trainer_state.json").read_text())
    with result.checkpoint.as_directory() as path:
        final_state = json.loads((Path(path) / adapter.IN_CHECKPOINT / "trainer_state.json").read_text())
    info = {
        "chosen_step": chosen_state["global_step"],
        "final_step": final_state["global_step"],
        "checkpoint": chosen.path,
        "log_history": final_state["log_history"],
    }
    return adapter_dir, info


def report_files(output_dir: Path) -> list[Path]:
    """What a run's trackers get besides the adapter: the report, its plots, the metrics and the config."""
    named = [output_dir / name for name in ("report.md", "metrics.json", "config.yaml")]
    return named + sorted(output_dir.glob("*.png"))


def train(run: RunConfig) -> TrainOutcome:
    """Setup, train, save, clean up: the whole job, top to bottom."""
    started = time.time()
    output_dir = Path(run.training.output_dir).resolve()
    prompting = Prompting.load(run.model)
    check_packing(run, prompting.kind)
    data = prepare(run, prompting)
    with tempfile.TemporaryDirectory(prefix="lorafleet-check-") as scratch:
        training_arguments(run, scratch, data.has_eval)  # HF's own checks, before Ray starts
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_config(run))
    tracked = tracking.start(run, output_dir)  # an unreachable tracker fails here, before Ray starts

    fit_started = time.time()
    try:
        result = fit(run, data, prompting, tracked=tracked)  # raises TrainingFailedError once max_failures is spent
    except BaseException:
        tracking.finish(tracked, [output_dir / "config.yaml"], failed=True)
        raise
    fit_seconds = time.time() - fit_started

    adapter_dir, info = export(result, run, output_dir, data.has_eval)
    metrics = report.summarize(info["log_history"], fit_seconds, time.time() - started)
    metrics.update(
        chosen_step=info["chosen_step"],
        final_step=info["final_step"],
        checkpoint=info["checkpoint"],
        kind=prompting.kind,
    )
    (output_dir / "metrics.json").write_text(
        json.dumps({**metrics, "data": data.report, "log_history": info["log_history"]}, indent=2)
    )
    report.write(output_dir, run, metrics, data.report, info["log_history"])
    tracking.finish(tracked, report_files(output_dir), adapter_dir if run.tracking.log_adapter else None, metrics)
    published = storage.publish(output_dir, run.ray.storage_path)
    return TrainOutcome(output_dir=output_dir, adapter_dir=adapter_dir, metrics=metrics, published=published)
