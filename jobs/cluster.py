"""Where Ray runs: an embedded local Ray or an existing cluster (that should check tokens), the
environment its jobs and workers get, and where a Ray Train run keeps its checkpoints.

Ray 2.60 turns token authentication on for the local Ray that `ray.init()` starts, but a cluster
started with `ray start` without a token runs with it off, and then anyone who reaches its ports
can run code on it. Connecting to such a cluster works silently, so this module says so.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import ray

from jobs.config import RunConfig

log = logging.getLogger("lorafleet.cluster")
# Passed to every job and Train worker: offline switches and the model cache. Anything else only when asked.
PASSED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "LORAFLEET_CACHE",
    "TOKENIZERS_PARALLELISM",
)
AUTH_OFF = (
    "the Ray cluster at {url} runs with token authentication OFF: anyone who can reach its ports can run code on it. "
    "Restart it with a token: `ray get-auth-token --generate`, then `ray start --head` (docs/guides/cluster.md, 'Keep Ray's token authentication on')"
)


def joins_cluster(address: str | None) -> bool:
    """Whether `ray.init(address)` joins an existing cluster (`address` or RAY_ADDRESS) rather than embedding one."""
    return address is not None or bool(os.environ.get("RAY_ADDRESS"))


def connect(address: str | None) -> None:
    """`ray.init` once per process: `address`, else RAY_ADDRESS, else an embedded local Ray."""
    if ray.is_initialized():
        return
    context = ray.init(address=address)
    if joins_cluster(address):
        warn_if_auth_off(context.dashboard_url)


def auth_mode(dashboard_url: str) -> str | None:
    """The cluster's own answer ("token" or "disabled"), from the dashboard route Ray serves without a token."""
    url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/authentication_mode", timeout=10) as response:
            return json.load(response).get("authentication_mode")
    except (urllib.error.URLError, OSError, ValueError):
        return None  # no dashboard (include_dashboard=False) or an older Ray: nothing to say


def warn_if_auth_off(dashboard_url: str | None) -> None:
    if dashboard_url and auth_mode(dashboard_url) == "disabled":
        log.warning(AUTH_OFF.format(url=dashboard_url))


def _storage_path(run: RunConfig) -> str:
    path = run.ray.storage_path
    return path if "://" in path else str(Path(path).resolve())


@dataclass
class RunPlacement:
    """Where a Ray Train run lives and who listens to it. A plain training job gets a fresh
    timestamped name; a sweep trial passes its trial id, so a restarted trial resumes its run."""

    name: str | None = None
    storage_path: str | None = None
    callbacks: tuple = ()
    score: tuple[str, str] = ("eval_loss", "min")


def train_run_config(
    run: RunConfig, has_eval: bool, placement: RunPlacement, passed: tuple[str, ...] = ()
) -> ray.train.RunConfig:
    """Ray Train's run config: name, storage, failure handling, checkpoints kept, the workers' environment."""
    import ray.train  # here: Ray Data's tasks import this module and need no Ray Train's start-up cost

    name = placement.name or f"{run.ray.name or Path(run.training.output_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return ray.train.RunConfig(
        name=name,
        storage_path=placement.storage_path or _storage_path(run),
        failure_config=ray.train.FailureConfig(max_failures=run.ray.max_failures),
        worker_runtime_env={"env_vars": passed_env(passed)},
        callbacks=list(placement.callbacks),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=run.training.keep_checkpoints,
            checkpoint_score_attribute=placement.score[0] if has_eval else None,
            checkpoint_score_order=placement.score[1],
        ),
    )


def passed_env(extra: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """What a job or a Train worker gets from this process's environment: PASSED_ENV and `extra`, where set."""
    return {name: os.environ[name] for name in (*PASSED_ENV, *extra) if name in os.environ}
