"""ASHA vs FIFO on the same search space, trials and budget: trial-steps spent and best metric reached.

    python bench/sweep_efficiency.py [--trials 12] [--steps 36] [--eval-steps 4]

Both sweeps sample the same trials (same search seed); FIFO runs every trial to the end, ASHA
stops the worst at each rung. Target: ASHA reaches at least 98% of FIFO's best with at most
40% of its trial-steps. Runs offline on a tiny random Llama (the real model would take hours
on CPU); the metric is eval loss, so "quality" is FIFO best / ASHA best (1.0 = same loss), and
the share of FIFO's loss improvement that ASHA kept is printed too, a stricter view.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
from results import markdown_row, target, write_result  # bench/ is this script's folder

from jobs.config import load_config
from tests import tiny_models
from tune.sweep import sweep


def run_sweep(model: Path, workdir: Path, scheduler: str, args) -> dict:
    run = load_config(None, [
        f"model.name={model}", "data.demo_rows=200", f"training.max_steps={args.steps}", f"training.eval_steps={args.eval_steps}",
        f"training.logging_steps={args.eval_steps}", "training.batch_size=4", "training.warmup_ratio=0", f"training.output_dir={workdir / 'train'}",
        f"ray.storage_path={workdir / 'ray'}", "ray.resources_per_worker={CPU: 1}",
        f"tune.output_dir={workdir / scheduler}", f"tune.scheduler={scheduler}", f"tune.num_samples={args.trials}", "tune.search_alg=random",
        f"tune.seed={args.seed}", "tune.reduction_factor=3", "tune.learning_rate=[1.0e-5, 1.0e-2]", "tune.lora_r=[2, 4, 8, 16]",
        "tune.target_modules=[attention, mlp, all-linear]",
    ])
    started = time.time()
    outcome = sweep(run)
    best = next(r for r in outcome.rows if r.best is not None)
    first_losses = [r.curve[0][1] for r in outcome.rows if r.curve]
    return {
        "trial_steps": outcome.summary["trial_steps"],
        "best": best.best,
        "best_params": best.params,
        "stopped": sum(r.status == "stopped early" for r in outcome.rows),
        "wall_s": time.time() - started,
        "configs": sorted(tuple(sorted(r.params.items())) for r in outcome.rows),
        "start_loss": max(first_losses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--steps", type=int, default=36, help="optimizer steps of a full trial")
    parser.add_argument("--eval-steps", type=int, default=4, help="evaluation interval = ASHA's first rung")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lorafleet-sweep-bench-") as tmp:
        workdir = Path(tmp)
        model = tiny_models.build("causal", workdir / "tiny-llama")
        ray.init()
        results = {scheduler: run_sweep(model, workdir, scheduler, args) for scheduler in ("fifo", "asha")}
        ray.shutdown()

    fifo, asha = results["fifo"], results["asha"]
    assert fifo["configs"] == asha["configs"], "both sweeps must sample the same trials"
    quality = fifo["best"] / asha["best"]
    steps_share = asha["trial_steps"] / fifo["trial_steps"]
    kept = (fifo["start_loss"] - asha["best"]) / (fifo["start_loss"] - fifo["best"])
    print(f"\nSweep efficiency: {args.trials} trials of up to {args.steps} steps, same sampled configs, eval loss (lower is better)\n")
    print("| Scheduler | Trial-steps | Trials stopped early | Best eval loss | Wall time (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    table = [{"Scheduler": name, "Trial-steps": str(r["trial_steps"]), "Trials stopped early": str(r["stopped"]), "Best eval loss": f"{r['best']:.4f}",
              "Wall time (s)": f"{r['wall_s']:.0f}"} for name, r in (("FIFO (every trial to the end)", fifo), ("ASHA", asha))]
    for row in table:
        print(markdown_row(row))
    print(f"\nASHA / FIFO trial-steps: {steps_share:.1%} (target <= 40%)")
    print(f"quality, FIFO best / ASHA best loss: {quality:.1%} (target >= 98%)")
    print(f"share of FIFO's loss improvement ASHA kept (from {fifo['start_loss']:.4f} at the first evaluation): {kept:.1%}")
    print(f"best trial: FIFO {fifo['best_params']}, ASHA {asha['best_params']}")
    print("targets met" if steps_share <= 0.40 and quality >= 0.98 else "targets NOT met")
    write_result("sweep_efficiency", args, table, [
        target("ASHA / FIFO trial-steps", 100 * steps_share, "<=", 40, "%"),
        target("quality, FIFO best / ASHA best eval loss", 100 * quality, ">=", 98, "%"),
    ])


if __name__ == "__main__":
    main()
