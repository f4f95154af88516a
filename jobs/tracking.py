"""Experiment tracking: one MLflow / W&B / TensorBoard run per training job; a sweep is one parent
run with one child run per trial.

The driver owns each run: before Ray starts it checks the tracker can be reached and creates the
run with the resolved config as parameters; at the end it uploads the report, plots and adapter.
The live metrics (loss, eval loss, task metrics, learning rate, tokens seen) come from the Hugging
Face Trainer's own integration callbacks in the rank-0 worker only, attached to that run by the
variables those callbacks read (MLFLOW_RUN_ID, TENSORBOARD_LOGGING_DIR, WANDB_RUN_ID).

Credentials are never config fields: MLflow's and W&B's own variables (MLFLOW_TRACKING_TOKEN,
WANDB_API_KEY, ...) reach Ray workers through the environment Ray gives them, and nothing here
copies them into a parameter, a log line or a file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import netrc
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.config import ConfigError, RunConfig, problem

log = logging.getLogger("lorafleet.tracking")
DEFAULT_EXPERIMENT = "lorafleet"
TRIAL_TAG = "lorafleet.trial"
SAVED = "tracking.json"
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}  # MLflow's UI opens on training runs, not GenAI
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on one parameter value
MLFLOW_BATCH = 100  # parameters per log_batch call


@dataclass
class Tracking:
    """One tracked run (a training job, a sweep, or one trial): picklable, so it travels to Ray workers."""

    backends: tuple[str, ...]
    name: str
    kind: str  # train, sweep or trial
    params: dict[str, str] = field(default_factory=dict)
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    tensorboard_dir: str | None = None
    wandb_id: str | None = None
    wandb_project: str | None = None
    wandb_mode: str | None = None
    wandb_group: str | None = None
    wandb_dir: str | None = None

    def worker_env(self) -> dict[str, str]:
        """What the Trainer's integration callbacks read to write into this run and nowhere else."""
        env = {}
        if self.mlflow_run_id:
            # MLFLOW_MAX_LOG_PARAMS=0: the driver logged the resolved config; the callback's own
            # parameters include the worker's temp folder, which differs after a restart (MLflow refuses a change).
            env |= {
                "MLFLOW_TRACKING_URI": self.mlflow_uri,
                "MLFLOW_EXPERIMENT_ID": self.mlflow_experiment_id,
                "MLFLOW_RUN_ID": self.mlflow_run_id,
                "MLFLOW_MAX_LOG_PARAMS": "0",
            }
        if self.tensorboard_dir:
            env["TENSORBOARD_LOGGING_DIR"] = self.tensorboard_dir
        return env

    def wandb_run(self) -> dict[str, Any]:
        """`wandb.init` arguments of this W&B run: the rank-0 worker opens it, the driver reopens it for artifacts."""
        return {
            "id": self.wandb_id,
            "name": self.name,
            "group": self.wandb_group,
            "project": self.wandb_project,
            "mode": self.wandb_mode,
            "dir": self.wandb_dir,
            "resume": "allow",
            "job_type": self.kind,
        }


def flat_params(run: RunConfig, sweep: bool = False) -> dict[str, str]:
    """The resolved config as dotted parameters: the sections a training run uses (a sweep's also tune.*)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and prefix.count(".") < 1:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            out[prefix] = value if isinstance(value, str) else json.dumps(value)

    walk("", run.model_dump(mode="json", exclude={"serve", "tracking"} | (set() if sweep else {"tune"})))
    return out


def _mlflow_uri(run: RunConfig) -> str:
    import mlflow

    uri = run.tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if "://" not in uri:  # a local folder: made absolute, since workers run in Ray's session folder
        return str(Path(uri).resolve())
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def _check_reachable(url: str, field_name: str, shown: str, fix: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError:
        return  # it answered: reachable (authentication is checked when the run is created)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError([problem(field_name, shown, f"cannot reach it ({reason}); {fix}")]) from None


def _mlflow_start(t: Tracking, run: RunConfig, parent: Tracking | None, trial: str | None) -> None:
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    t.mlflow_uri = _mlflow_uri(run)
    if t.mlflow_uri.startswith(("http://", "https://")):
        fix = "start the server (mlflow server --port ...) or fix tracking.mlflow_tracking_uri / MLFLOW_TRACKING_URI"
        _check_reachable(f"{t.mlflow_uri.rstrip('/')}/health", "tracking.mlflow_tracking_uri", t.mlflow_uri, fix)
    client = MlflowClient(t.mlflow_uri)
    try:
        if parent is not None:
            t.mlflow_experiment_id = parent.mlflow_experiment_id
        else:
            name = run.tracking.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            found = client.get_experiment_by_name(name)
            t.mlflow_experiment_id = (
                found.experiment_id if found else client.create_experiment(name, tags=EXPERIMENT_TAGS)
            )
        t.mlflow_run_id = _existing_trial_run(client, t, parent, trial) or _new_run(client, t, parent, trial)
        params = [Param(key, value[:MLFLOW_PARAM_CHARS]) for key, value in t.params.items()]
        for start in range(0, len(params), MLFLOW_BATCH):
            client.log_batch(t.mlflow_run_id, params=params[start : start + MLFLOW_BATCH])
    except MlflowException as error:
        fix = "check the server and its credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)"
        raise ConfigError([problem("tracking.mlflow_tracking_uri", t.mlflow_uri, f"{error.message}; {fix}")]) from None


def _new_run(client, t: Tracking, parent: Tracking | None, trial: str | None) -> str:
    tags = {"lorafleet.kind": t.kind}
    if parent is not None:
        tags |= {"mlflow.parentRunId": parent.mlflow_run_id, TRIAL_TAG: trial}
    return client.create_run(t.mlflow_experiment_id, run_name=t.name, tags=tags).info.run_id


def _existing_trial_run(client, t: Tracking, parent: Tracking | None, trial: str | None) -> str | None:
    """A retried or resumed trial writes on in the child run it started."""
    if parent is None:
        return None
    query = f"tags.mlflow.parentRunId = '{parent.mlflow_run_id}' and tags.`{TRIAL_TAG}` = '{trial}'"
    found = client.search_runs([t.mlflow_experiment_id], filter_string=query, max_results=1)
    return found[0].info.run_id if found else None


def _wandb_start(t: Tracking, run: RunConfig, out_dir: Path, parent: Tracking | None, trial: str | None) -> None:
    t.wandb_project = run.tracking.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_EXPERIMENT
    t.wandb_mode = run.tracking.wandb_mode or os.environ.get("WANDB_MODE") or "online"
    t.wandb_dir = str(out_dir)
    if parent is not None:  # a trial: its id is fixed by the sweep's, so a retried trial resumes it
        t.wandb_id, t.wandb_group = f"{parent.wandb_id}-{trial}", parent.wandb_group
    else:
        t.wandb_id, t.wandb_group = uuid.uuid4().hex[:12], t.name if t.kind == "sweep" else None
    if t.wandb_mode == "online":
        _check_wandb_online()


def _check_wandb_online() -> None:
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        logged_in = netrc.netrc().authenticators(urllib.parse.urlparse(base).hostname) is not None  # `wandb login`
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    if not (os.environ.get("WANDB_API_KEY") or logged_in):
        raise ConfigError(
            [
                problem(
                    "tracking.wandb_mode",
                    "online",
                    "no W&B API key: set WANDB_API_KEY (or run `wandb login`), or tracking.wandb_mode: offline",
                )
            ]
        )
    _check_reachable(base, "tracking.wandb_mode", "online", "check the network or WANDB_BASE_URL, or use offline")


def start(
    run: RunConfig, out_dir: Path, kind: str = "train", parent: Tracking | None = None, trial: str | None = None
) -> Tracking | None:
    """Check each tracker and open this job's run in it: kind train, sweep, or trial (a child of `parent`).
    Raises ConfigError, naming the setting, when a tracker cannot be used: before Ray starts."""
    backends = tuple(run.tracking.backends)
    if not backends:
        return None
    name = trial or run.tracking.run_name or out_dir.name
    t = Tracking(backends=backends, name=name, kind=kind, params=flat_params(run, sweep=kind == "sweep"))
    if "mlflow" in backends:
        _mlflow_start(t, run, parent, trial)
    if "tensorboard" in backends and kind != "sweep":  # a sweep's events are its trials'
        t.tensorboard_dir = str(out_dir / "tensorboard" / (trial or ""))
    if "wandb" in backends:
        _wandb_start(t, run, out_dir, parent, trial)
    log.info("tracking run %r in %s", name, ", ".join(backends))
    return t


def worker_callbacks(t: Tracking | None) -> list:
    """The Trainer's own integration callbacks, for the rank-0 worker: they log every logging and
    evaluation step into the run `start` opened."""
    if t is None:
        return []
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)  # the run's experiment is given by id
    os.environ.update(t.worker_env())
    callbacks = []
    if t.mlflow_run_id:
        callbacks.append(MLflowCallback())
    if t.tensorboard_dir:
        callbacks.append(TensorBoardCallback())
    if t.wandb_id:
        import wandb

        # Opened here, not by the callback, so the run has our id, group and config (the callback adds its own).
        wandb.init(**t.wandb_run(), config=t.params)
        callbacks.append(WandbCallback())
    return callbacks


def worker_done(t: Tracking | None) -> None:
    if t is not None and t.wandb_id:
        import wandb

        wandb.finish()


def finish(
    t: Tracking | None,
    files: list[Path],
    adapter_dir: Path | None = None,
    summary: dict[str, Any] | None = None,
    failed: bool = False,
) -> None:
    """Upload the report, plots and (tracking.log_adapter) adapter, then close the run."""
    if t is None:
        return
    adapter_dir = adapter_dir if adapter_dir and adapter_dir.is_dir() else None
    if t.mlflow_run_id:
        _mlflow_finish(t, files, adapter_dir, failed)
    if t.wandb_id and (files or adapter_dir):  # a trial's worker already wrote its history and summary
        _wandb_finish(t, files, adapter_dir, summary or {})


def _mlflow_finish(t: Tracking, files: list[Path], adapter_dir: Path | None, failed: bool) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(t.mlflow_uri)
    for path in files:
        if path.is_file():
            client.log_artifact(t.mlflow_run_id, str(path))
    if adapter_dir is not None:
        client.log_artifacts(t.mlflow_run_id, str(adapter_dir), artifact_path="adapter")
    client.set_terminated(t.mlflow_run_id, status="FAILED" if failed else "FINISHED")


def _wandb_finish(t: Tracking, files: list[Path], adapter_dir: Path | None, summary: dict[str, Any]) -> None:
    import wandb

    with wandb.init(**t.wandb_run()) as wb:
        wb.summary.update({key: value for key, value in summary.items() if isinstance(value, (int, float, str))})
        report = wandb.Artifact(f"{t.name}-report", type="report")
        for path in files:
            if path.is_file():
                report.add_file(str(path))
        wb.log_artifact(report)
        if adapter_dir is not None:
            model = wandb.Artifact(f"{t.name}-adapter", type="model")
            model.add_dir(str(adapter_dir))
            wb.log_artifact(model)


def save(t: Tracking | None, folder: Path) -> None:
    """The sweep's run ids, so `lorafleet sweep --resume` writes on in the same parent run."""
    if t is not None:
        (folder / SAVED).write_text(json.dumps(dataclasses.asdict(t), indent=2))


def resumed(folder: Path) -> Tracking | None:
    saved = folder / SAVED
    if not saved.is_file():
        return None
    data = json.loads(saved.read_text())
    return Tracking(**{**data, "backends": tuple(data["backends"])})


def close_unfinished_trials(parent: Tracking | None) -> None:
    """Trials the scheduler stopped early end without closing their run: mark them finished."""
    if parent is None or not parent.mlflow_run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent.mlflow_uri)
    query = f"tags.mlflow.parentRunId = '{parent.mlflow_run_id}' and attributes.status = 'RUNNING'"
    for child in client.search_runs([parent.mlflow_experiment_id], filter_string=query):
        client.set_terminated(child.info.run_id, status="FINISHED")
