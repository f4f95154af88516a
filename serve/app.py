"""The Serve application: deployments from the `serve:` section, run or written as a Serve config.

lorafleet serve --config configs/squad-smollm2.yaml serve.adapters.squad=runs/squad-sweep/best/adapter
lorafleet serve --config ... --build > serve_config.yaml && serve deploy serve_config.yaml
ray job submit --working-dir . -- python -m serve --config configs/squad-smollm2.yaml
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import yaml
from ray import serve
from ray.serve import Application

from jobs import adapter, cluster, registry, storage
from jobs.config import ConfigError, RunConfig, as_json, with_absolute_paths
from jobs.model import load_tokenizer, model_kind
from serve import adapters, drain
from serve.api import Gateway, base_model_name
from serve.choice import EngineChoice, choose
from serve.engine import Engine
from serve.vllm_engine import VllmEngine

log = logging.getLogger("lorafleet.serve")
IMPORT_PATH = "serve.app:build_app"
GATEWAY_HEADROOM = 16  # requests past the limit still reach the gateway, which answers them with a 429


def _actor_options(resources: dict[str, float]) -> dict[str, Any]:
    extra = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    options: dict[str, Any] = {"num_cpus": resources.get("CPU", 1), "num_gpus": resources.get("GPU", 0)}
    if "memory" in resources:
        options["memory"] = resources["memory"]
    if extra:
        options["resources"] = extra
    return options


def autoscaling(run: RunConfig) -> dict[str, Any]:
    s = run.serve
    return {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "initial_replicas": s.initial_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
        "upscale_delay_s": s.upscale_delay_s,
        "downscale_delay_s": s.downscale_delay_s,
    }


def application(run: RunConfig, choice: EngineChoice | None = None) -> Application:
    """Gateway (HTTP, no model) -> engine (base + multiplexed adapters: HF or vLLM), both from the config."""
    run = with_absolute_paths(run)  # replicas do not run in the user's folder
    choice = choice or choose(run)
    log.info("%s", choice.line())
    s = run.serve
    raw = as_json(run)
    deployment = VllmEngine if choice.name == "vllm" else Engine
    engine = deployment.options(
        autoscaling_config=autoscaling(run),
        max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options=_actor_options(s.replica_resources),
        graceful_shutdown_timeout_s=s.drain_timeout_s,
    ).bind(raw)
    api_key = s.api_key.get_secret_value() if s.api_key else None
    return Gateway.options(
        num_replicas=s.api_replicas,
        max_ongoing_requests=s.max_concurrent_requests + GATEWAY_HEADROOM,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=s.drain_timeout_s,
    ).bind(engine, raw, choice.name, api_key)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for Serve config files (`import_path: serve.app:build_app`)."""
    return application(RunConfig.model_validate(args["config"]))


def check(run: RunConfig) -> EngineChoice:
    """Fail before Ray starts: the model loads its tokenizer, every named adapter exists and the engine can serve
    the model; returns the engine choice."""
    problems = [
        f"serve.adapters.{name} = {path!r}: no {adapter.CONFIG} + {adapter.WEIGHTS} there; train or sweep first, or "
        "fix the path"
        for name, path in run.serve.adapters.items()
        if not adapters.exists(path)
    ]
    root = run.serve.adapter_root
    if root and not storage.is_remote(root) and not os.path.isdir(root):
        problems.append(f"serve.adapter_root = {root!r}: no such folder; create it or fix the path")
    elif root and storage.is_remote(root):
        try:
            registry.names(root)
        except OSError as exc:
            problems.append(f"serve.adapter_root = {root!r}: cannot be read ({exc}); check the URI and credentials")
    if problems:
        raise ConfigError(problems, "serve")
    model_kind(run.model)
    load_tokenizer(run.model)
    return choose(run)


def serve_config(run: RunConfig) -> str:
    """A Serve config file (`serve deploy`) running this application with this config."""
    run = with_absolute_paths(run)
    app = {
        "name": run.serve.name,
        "route_prefix": run.serve.route_prefix,
        "import_path": IMPORT_PATH,
        "args": {"config": as_json(run, exclude={"serve": {"api_key"}})},
    }
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": run.serve.host, "port": run.serve.port},
        "applications": [app],
    }
    note = ""
    if run.serve.api_key:
        note = (
            f"# The API key is not written here: set {run.serve.api_key_env} in the replicas' environment "
            "(runtime_env.env_vars or the node).\n"
        )
    return note + yaml.safe_dump(doc, sort_keys=False)


def endpoint(run: RunConfig) -> str:
    host = "localhost" if run.serve.host in ("0.0.0.0", "127.0.0.1") else run.serve.host
    return f"http://{host}:{run.serve.port}{run.serve.route_prefix.rstrip('/')}/v1"


@dataclass(frozen=True)
class Deployed:
    url: str  # the OpenAI-compatible endpoint, ending in /v1
    engine: EngineChoice


def deploy(run: RunConfig) -> Deployed:
    """Start Serve (embedded Ray without an address) and deploy."""
    choice = check(run)
    cluster.connect(run.ray.address)
    if embedded(run):  # this process stops the app: on SIGTERM it drains first (serve.drain)
        drain.take_sigterm()
        drain.create(run.serve.name)
    serve.start(http_options={"host": run.serve.host, "port": run.serve.port})
    serve.run(application(run, choice), name=run.serve.name, route_prefix=run.serve.route_prefix)
    return Deployed(endpoint(run), choice)


def serving_summary(run: RunConfig, deployed: Deployed) -> str:
    """What `lorafleet serve` prints once the app is up: where, which models and engine, a request to try."""
    models = ", ".join([base_model_name(run), *adapters.names(run.serve)])
    key = " -H 'Authorization: Bearer $KEY'" if run.serve.bearer_token() else ""
    url = deployed.url
    return f"serving {url}  models: {models}\n{deployed.engine.line()}\ntry: curl {url}/models{key}"


def embedded(run: RunConfig) -> bool:
    """No cluster address anywhere: the app lives only as long as this process's Ray."""
    return not cluster.joins_cluster(run.ray.address)


def serve_until_stopped(run: RunConfig) -> None:
    """Keep an embedded Ray (and with it the app) up until SIGTERM or Ctrl-C, then drain and stop."""
    drain.serve_until_stopped(run.serve.name, run.serve.drain_timeout_s)
