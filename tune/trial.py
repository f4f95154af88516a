"""One sweep trial: a full Ray Train run of the training job (Ray 2.6x's Train-inside-Tune pattern).

The Tune trial is only the driver of its `TorchTrainer`; the workers (one or many, CPU or GPU)
are scheduled by Ray Train, and every report reaches Tune through `TuneReportCallback`. The
Train run is named after the trial, so a retried or resumed trial continues from its latest
checkpoint instead of starting over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from jobs import tracking
from jobs.cluster import RunPlacement
from jobs.data import Prepared, prepare
from jobs.prompting import Prompting
from jobs.train import fit
from tune.space import trial_config


def run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    targets: dict[str, Any],
    alpha_ratio: float | None,
    storage: str,
    score: tuple[str, str],
    sweep_dir: str,
    tracked: tracking.Tracking | None,
    shared: Prepared | None = None,
) -> None:
    run = trial_config(base, params, targets, alpha_ratio)
    trial_id = ray.tune.get_context().get_trial_id()
    prompting = Prompting.load(run.model)
    placement = RunPlacement(name=trial_id, storage_path=storage, callbacks=(TuneReportCallback(),), score=score)
    child = tracking.start(run, Path(sweep_dir), kind="trial", parent=tracked, trial=trial_id)
    try:
        data = shared if shared is not None and shared.serves(run) else prepare(run, prompting)
        result = fit(run, data, prompting, placement, tracked=child)
    except BaseException:
        tracking.finish(child, [], failed=True)
        raise
    tracking.finish(child, [], summary=result.metrics)
