"""The sweep job: Ray Tune over the training job.

    lorafleet sweep --config configs/squad-smollm2.yaml [dotted.key=value ...]
    lorafleet sweep --resume runs/squad-sweep
    ray job submit --working-dir . -- python -m tune --config configs/squad-smollm2.yaml

The driver validates the config, the search space and the data before any Ray resource is
requested, runs one Tune trial per sampled config (each a full Ray Train run), then writes
the leaderboard, the curves and the best adapter under `tune.output_dir`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from jobs import cluster, storage, tracking
from jobs.config import (
    ConfigError,
    RunConfig,
    TuneSection,
    dump_config,
    load_config,
    sweep_problems,
    with_absolute_paths,
)
from jobs.data import Prepared, prepare
from jobs.prompting import Prompting
from jobs.train import check_packing
from tune import leaderboard
from tune.space import max_trial_steps, param_space, resolve_target_sets
from tune.trial import run_trial

SWEEP_CONFIG = "sweep.yaml"
EXPERIMENT = "trials"  # Tune's experiment folder (trial logs, TensorBoard events, state for --resume)
TRAIN_RUNS = "checkpoints"  # each trial's Ray Train run and its checkpoints
TRIAL_DRIVER_MEMORY = 512 * 1024**2


@dataclass
class SweepOutcome:
    sweep_dir: Path
    rows: list[leaderboard.TrialRow]
    summary: dict[str, Any]
    summary_md: str  # the leaderboard's head, for the CLI to print
    published: str | None = None  # the results' copy on ray.storage_path when that is s3:// or gs://


@dataclass
class SweepPlan:
    """Everything checked and derived before Ray starts."""

    run: RunConfig
    base: dict[str, Any]
    targets: dict[str, Any]
    n_train: int
    max_steps: int
    # Prepared rows every trial that reads the same data trains on (`Prepared.serves`); None: each prepares its own.
    shared: Prepared | None = None


def plan(run: RunConfig) -> SweepPlan:
    problems = sweep_problems(run)
    if problems:
        raise ConfigError(problems, "tune")
    run = with_absolute_paths(run)  # trials run in Ray's session folder, not here
    targets = resolve_target_sets(run)
    prompting = Prompting.load(run.model)
    check_packing(run, prompting.kind)
    data = prepare(run, prompting)  # bad data fails here, not in 8 trials
    base = run.model_dump(mode="json", exclude={"tune"})
    return SweepPlan(
        run=run,
        base=base,
        targets=targets,
        n_train=data.train_rows,
        max_steps=max_trial_steps(run, data.train_rows),
        shared=data if data.serves(run) else None,
    )


def _scheduler(p: SweepPlan):
    t = p.run.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    grace = min(t.grace_period or p.run.training.eval_steps, p.max_steps)
    return ASHAScheduler(time_attr="step", max_t=p.max_steps, grace_period=grace, reduction_factor=t.reduction_factor)


def _search_alg(run: RunConfig, concurrent: int):
    if run.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=run.tune.seed), max_concurrent=concurrent)
    # Random sampling and grids; Tune ignores TuneConfig.max_concurrent_trials for this one.
    return BasicVariantGenerator(random_state=run.tune.seed, max_concurrent=concurrent)


def max_concurrent_trials(run: RunConfig) -> int:
    """As many trials as the cluster fits whole: each needs num_workers x resources_per_worker."""
    if run.tune.max_concurrent_trials:
        return run.tune.max_concurrent_trials
    per_trial = {
        name: amount * run.ray.num_workers for name, amount in run.ray.resources_per_worker.items() if amount > 0
    }
    if run.ray.use_gpu:
        per_trial.setdefault("GPU", run.ray.num_workers)
    available = ray.cluster_resources()
    return max(1, min(int(available.get(name, 0) // amount) for name, amount in per_trial.items()))


def _train_runs(run: RunConfig, sweep_dir: Path) -> str:
    """Where the trials' Ray Train runs keep their checkpoints: on an object store when
    ray.storage_path is one (trials on other nodes write there), else beside the results."""
    if storage.is_remote(run.ray.storage_path):
        return f"{run.ray.storage_path.rstrip('/')}/{sweep_dir.name}-{TRAIN_RUNS}"
    return str(sweep_dir / TRAIN_RUNS)


def _trainable(p: SweepPlan, sweep_dir: Path, tracked: tracking.Tracking | None):
    t = p.run.tune
    fn = tune.with_parameters(
        run_trial,
        base=p.base,
        targets=p.targets,
        alpha_ratio=t.lora_alpha_ratio,
        storage=_train_runs(p.run, sweep_dir),
        score=(t.metric, t.resolved_mode()),
        sweep_dir=str(sweep_dir),
        tracked=tracked,
        shared=p.shared,
    )
    # The trial only drives its Train run, whose workers hold the CPUs/GPUs; it asks for memory
    # alone (Tune refuses an all-zero request), so a trial on a full node still gets its workers.
    return tune.with_resources(fn, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})


def trials_to_sample(t: TuneSection) -> int:
    """Tune's num_samples: under grid search it repeats the grid, so it defaults to one pass."""
    return t.num_samples if t.search_alg != "grid" or "num_samples" in t.model_fields_set else 1


def _tuner(p: SweepPlan, sweep_dir: Path, resume: bool, tracked: tracking.Tracking | None) -> tune.Tuner:
    experiment = sweep_dir / EXPERIMENT
    if resume:
        # Finished and failed trials stay as they are; interrupted ones continue from their checkpoints.
        return tune.Tuner.restore(
            str(experiment), trainable=_trainable(p, sweep_dir, tracked), resume_unfinished=True, resume_errored=False
        )
    t = p.run.tune
    return tune.Tuner(
        _trainable(p, sweep_dir, tracked),
        param_space=param_space(p.run),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.resolved_mode(),
            num_samples=trials_to_sample(t),
            search_alg=_search_alg(p.run, max_concurrent_trials(p.run)),
            scheduler=_scheduler(p),
            time_budget_s=t.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(sweep_dir),
            failure_config=tune.FailureConfig(max_failures=t.trial_retries),
        ),
    )


def _prepare_dir(run: RunConfig, sweep_dir: Path, resume: bool) -> None:
    experiment = sweep_dir / EXPERIMENT
    if resume and not tune.Tuner.can_restore(str(experiment)):
        raise ConfigError(
            [
                f"--resume = {str(sweep_dir)!r}: no sweep to resume there (no {EXPERIMENT}/ state); start one with "
                "lorafleet sweep --config FILE"
            ]
        )
    if not resume and experiment.exists():
        raise ConfigError(
            [
                f"tune.output_dir = {run.tune.output_dir!r}: already holds a sweep; resume it with lorafleet sweep "
                f"--resume {sweep_dir}, or set another tune.output_dir"
            ]
        )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_CONFIG).write_text(dump_config(run))


def write_results(
    p: SweepPlan, sweep_dir: Path, wall_s: float
) -> tuple[list[leaderboard.TrialRow], dict[str, Any], str]:
    metric = p.run.tune.metric
    rows = leaderboard.collect(sweep_dir / EXPERIMENT, p.run, p.base, p.targets, p.n_train)
    lineage = leaderboard.export_best(rows, sweep_dir, p.run, p.base, p.targets)
    best = (
        {"trial_id": lineage["trial_id"], "step": lineage["step"], "metrics": lineage["metrics"]} if lineage else None
    )
    summary = {
        "trials": len(rows),
        "trial_steps": sum(r.steps_run for r in rows),
        "wall_s": round(wall_s, 1),
        "max_steps_per_trial": p.max_steps,
        "best": best,
    }
    leaderboard.write_csv(rows, sweep_dir / "leaderboard.csv", metric)
    leaderboard.plot_curves(rows, sweep_dir / "curves.png", metric)
    head = leaderboard.write_markdown(rows, sweep_dir / "leaderboard.md", p.run, summary)
    (sweep_dir / "sweep.json").write_text(
        json.dumps({**summary, "rows": leaderboard.rows_as_dicts(rows)}, indent=2, default=str)
    )
    return rows, summary, head


def result_files(sweep_dir: Path) -> list[Path]:
    """What the sweep's trackers get besides the best adapter."""
    names = ("leaderboard.md", "leaderboard.csv", "curves.png", "sweep.json", SWEEP_CONFIG, "best/lineage.json")
    return [sweep_dir / name for name in names]


def sweep(run: RunConfig, resume: bool = False) -> SweepOutcome:
    """Check, sweep, write results: the whole job, top to bottom."""
    started = time.time()
    sweep_dir = Path(run.tune.output_dir).resolve()
    p = plan(run)
    _prepare_dir(p.run, sweep_dir, resume)  # sweep.yaml with absolute paths: --resume works from any folder
    tracked = tracking.resumed(sweep_dir) if resume else tracking.start(p.run, sweep_dir, kind="sweep")
    tracking.save(tracked, sweep_dir)
    cluster.connect(run.ray.address)
    tuner = _tuner(p, sweep_dir, resume, tracked)
    try:
        tuner.fit()
    except BaseException:
        tracking.finish(tracked, [sweep_dir / SWEEP_CONFIG], failed=True)
        raise
    rows, summary, head = write_results(p, sweep_dir, time.time() - started)
    tracking.close_unfinished_trials(tracked)
    best_adapter = sweep_dir / "best" / "adapter" if p.run.tracking.log_adapter else None
    tracking.finish(tracked, result_files(sweep_dir), best_adapter, summary)
    published = storage.publish(sweep_dir, run.ray.storage_path, skip=(TRAIN_RUNS, EXPERIMENT))
    return SweepOutcome(sweep_dir=sweep_dir, rows=rows, summary=summary, summary_md=head, published=published)


def resume_config(sweep_dir: Path) -> RunConfig:
    """The config a sweep was started with, pointed at where its folder is now."""
    saved = sweep_dir / SWEEP_CONFIG
    if not saved.is_file():
        raise ConfigError(
            [
                f"--resume = {str(sweep_dir)!r}: no {SWEEP_CONFIG} there; pass the folder a sweep wrote (its "
                "tune.output_dir)"
            ]
        )
    return load_config(saved, [f"tune.output_dir={sweep_dir}"])
