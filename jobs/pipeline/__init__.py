"""The pipeline job: train (or sweep, when the config has a `tune:` section) -> evaluate the best
adapter against the base model -> deploy it with Serve -> send a smoke request.

    lorafleet pipeline --config configs/demo.yaml
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/squad-smollm2.yaml

On an embedded Ray the app ends with the job unless `--keep-serving`; on a cluster it stays up. With
`promote.registry` set, the adapter is published there and made current only past the evaluation gate
(`jobs.pipeline.gate`), and the app serves the registry's current version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import httpx

from jobs import storage
from jobs.config import RunConfig, ServeSection, load_config
from jobs.data import generation_prompt, held_out_examples
from jobs.evaluation import run_eval
from jobs.pipeline.gate import GateDecision, gate
from jobs.prompting import Prompting


class PipelineFailed(RuntimeError):
    """A stage produced nothing the next stage can use (e.g. no sweep trial reported its metric)."""


@dataclass
class Fitted:
    """What training or a sweep hands on: the adapter, the run config that made it, its report."""

    adapter: Path
    run: RunConfig
    report: Path  # leaderboard.md (sweep) or report.md (training)
    summary_md: str  # the sweep's leaderboard head; empty for training, whose eval says it all
    published: str | None  # the outputs' copy on ray.storage_path (s3:// or gs://), None when storage is local


@dataclass
class PipelineOutcome:
    adapter: Path
    summary: Path  # leaderboard.md (sweep) or report.md (training)
    eval_report: Path
    endpoint: str
    adapter_name: str
    smoke: dict
    summary_md: str  # leaderboard head (sweep), eval head and the smoke request, for the CLI to print
    published: str | None = None  # the outputs' copy on ray.storage_path (s3:// or gs://), which Serve loads from
    gate: GateDecision | None = None  # with promote.registry: the version published and whether it was made current


def adapter_name(run: RunConfig) -> str:
    folder = Path(run.tune.output_dir if run.is_sweep else run.training.output_dir).name
    return re.sub(r"[^A-Za-z0-9_.-]", "-", folder).lstrip("._-")[:64] or "adapter"


def fit(run: RunConfig) -> Fitted:
    """Train, or sweep and take the best trial."""
    if run.is_sweep:
        from tune.sweep import sweep

        outcome = sweep(run)
        if outcome.summary["best"] is None:
            raise PipelineFailed(f"no trial reported {run.tune.metric}; see {outcome.sweep_dir / 'leaderboard.md'}")
        best = outcome.sweep_dir / "best"
        return Fitted(
            best / "adapter",
            load_config(best / "config.yaml"),
            outcome.sweep_dir / "leaderboard.md",
            outcome.summary_md,
            outcome.published,
        )
    from jobs.train import train

    outcome = train(run)
    return Fitted(outcome.adapter_dir, run, outcome.output_dir / "report.md", "", outcome.published)


def smoke_request(endpoint: str, name: str, run: RunConfig, api_key: str | None) -> dict:
    """One held-out example through the deployed app, as a client would send it."""
    example = held_out_examples(run)[0]
    use_chat = Prompting.load(run.model).use_chat
    limits = {
        "model": name,
        "max_tokens": min(run.eval.max_new_tokens, run.serve.max_tokens_limit),
        "temperature": 0,
        "stop": run.eval.stop[:4] or None,
    }
    asked = generation_prompt(example)  # a conversation's turns go as they are
    messages = asked if isinstance(asked, list) else [{"role": "user", "content": asked}]
    route, body = (
        ("/chat/completions", {**limits, "messages": messages})
        if use_chat
        else ("/completions", {**limits, "prompt": example["prompt"]})
    )
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.post(endpoint + route, json=body, headers=headers, timeout=300)
    if response.status_code != 200:
        raise PipelineFailed(
            f"smoke request to {endpoint + route} answered {response.status_code}: {response.text[:500]}"
        )
    choice = response.json()["choices"][0]
    answer = choice["message"]["content"] if use_chat else choice["text"]
    return {
        "route": route,
        "prompt": example["prompt"],
        "answer": answer,
        "references": example["references"],
        "finish_reason": choice["finish_reason"],
    }


def pipeline(run: RunConfig) -> PipelineOutcome:
    """Fit, evaluate, deploy, smoke-test: the whole job, top to bottom."""
    from serve import app as serve_app

    fitted = fit(run)
    eval_dir = fitted.adapter.parent / "eval"
    evaluated = run_eval(fitted.run, fitted.adapter, True, eval_dir)
    source = str(fitted.adapter.resolve())
    # The eval report joins the published outputs; replicas on other nodes load the adapter from there.
    if fitted.published:
        root = fitted.report.parent
        storage.upload(eval_dir, f"{fitted.published}/{eval_dir.relative_to(root).as_posix()}")
        source = f"{fitted.published}/{fitted.adapter.relative_to(root).as_posix()}"
    name = run.promote.name or adapter_name(run)
    decision = gate(fitted.run, fitted.adapter, evaluated, name, eval_dir) if run.promote.registry else None
    serving = fitted.run.model_copy(update={"serve": served_from(run, name, source, decision)})
    endpoint = serve_app.deploy(serving).url
    smoke = smoke_request(endpoint, name, fitted.run, serving.serve.bearer_token())
    told = [
        fitted.summary_md,
        evaluated.summary_md,
        decision.markdown() if decision else "",
        smoke_summary(smoke, name),
    ]
    return PipelineOutcome(
        adapter=fitted.adapter,
        summary=fitted.report,
        eval_report=evaluated.report,
        endpoint=endpoint,
        adapter_name=name,
        smoke=smoke,
        summary_md="\n".join(part for part in told if part),
        published=fitted.published,
        gate=decision,
    )


def served_from(run: RunConfig, name: str, source: str, decision: GateDecision | None) -> ServeSection:
    """What the app serves under `name`: the adapter itself, or, behind the gate, the registry's current version
    (the registry is `serve.adapter_root`, so later publishes and rollbacks roll out)."""
    if decision is None:
        return run.serve.model_copy(update={"adapters": {**run.serve.adapters, name: source}})
    return run.serve.model_copy(update={"adapter_root": run.promote.registry})


def smoke_summary(smoke: dict, name: str) -> str:
    return (
        f"smoke request ({smoke['route']}, model {name!r}):\n"
        f"  prompt:    {smoke['prompt'][:300]!r}\n"
        f"  answer:    {smoke['answer']!r}\n"
        f"  reference: {smoke['references'][0]!r}"
    )
