"""The search space: from the validated `tune:` section to Ray Tune domains, and back to a run config.

Named target-module sets (`attention`, `mlp`, `attention+mlp`, `all-linear`) are resolved per
architecture by listing the model's linear layers on the meta device (no weights are loaded),
so the same sweep config works for Llama, T5, GPT-2, Phi and others.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
from ray import tune
from transformers.pytorch_utils import Conv1D

from jobs.config import ConfigError, RunConfig, SearchDimension, set_dotted
from jobs.model import auto_model_class, model_config, model_kind

# Settings that change how many optimizer steps a trial runs.
STEP_KEYS = (
    "training.max_steps",
    "training.num_epochs",
    "training.batch_size",
    "training.gradient_accumulation_steps",
    "ray.num_workers",
)


def linear_layers(run: RunConfig) -> tuple[list[str], list[str]]:
    """(attention, other) projection names of the architecture, as `parent.child` suffixes PEFT matches."""
    config = model_config(run.model)  # model.revision's config, as training loads it
    with torch.device("meta"):
        model = auto_model_class(model_kind(run.model)).from_config(
            config, trust_remote_code=run.model.trust_remote_code
        )
    head = model.get_output_embeddings()
    attention, other = set(), set()
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or module is head:
            continue
        parts = name.split(".")
        suffix = ".".join(parts[-2:])
        (attention if any("attn" in p.lower() or "attention" in p.lower() for p in parts[:-1]) else other).add(suffix)
    return sorted(attention), sorted(other)


def target_label(value: str | list[str]) -> str:
    """Tune and Optuna sample strings; an explicit module list travels as 'a,b,c'."""
    return value if isinstance(value, str) else ",".join(value)


def resolve_target_sets(run: RunConfig) -> dict[str, str | list[str]]:
    """Label -> module names (or 'all-linear') for every target_modules candidate of the sweep."""
    dim = run.tune.dimensions().get("lora.target_modules")
    if dim is None:
        return {}
    attention, other = linear_layers(run)
    named = {"attention": attention, "mlp": other, "attention+mlp": attention + other}
    resolved, problems = {}, []
    for value in dim.candidates():
        if value == "all-linear":
            resolved[value] = value
        elif isinstance(value, str):
            if not named[value]:
                problems.append(
                    f"tune.target_modules = {value!r}: this architecture has no {value} projections; use another set "
                    "or list module names"
                )
            resolved[value] = named[value]
        else:
            resolved[target_label(value)] = list(value)
    if problems:
        raise ConfigError(problems, "tune")
    return resolved


def _domain(dim: SearchDimension, grid: bool, key: str) -> Any:
    values = dim.candidates()
    if key == "lora.target_modules":
        values = [target_label(v) for v in values]
    if dim.kind == "grid" or (grid and dim.kind == "choice"):
        return tune.grid_search(values)
    if dim.kind == "choice":
        return tune.choice(values)
    if dim.kind == "uniform":
        return tune.uniform(*values)
    if dim.kind == "loguniform":
        return tune.loguniform(*values)
    return tune.randint(values[0], values[1] + 1)  # config bounds are inclusive, Tune's upper is not


def param_space(run: RunConfig) -> dict[str, Any]:
    """Flat {dotted key: Tune domain}: what each trial receives as its config."""
    grid = run.tune.search_alg == "grid"
    return {key: _domain(dim, grid, key) for key, dim in run.tune.dimensions().items()}


def trial_config(
    base: dict[str, Any], params: dict[str, Any], targets: dict[str, Any], alpha_ratio: float | None
) -> RunConfig:
    """The run config of one trial: the sweep's base config with the sampled values set."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(raw, key, targets[value] if key == "lora.target_modules" else value)
    if "lora.r" in params and alpha_ratio is not None:
        raw["lora"]["alpha"] = max(1, round(alpha_ratio * params["lora.r"]))
    return RunConfig.model_validate(raw)


def planned_steps(run: RunConfig, n_train: int) -> int:
    t = run.training
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = math.ceil(n_train / (t.batch_size * t.gradient_accumulation_steps * run.ray.num_workers))
    return math.ceil(per_epoch * t.num_epochs)


def max_trial_steps(run: RunConfig, n_train: int) -> int:
    """ASHA's horizon: the longest trial the space allows (a shorter max_t would cut trials off)."""
    dims = {k: d.candidates() for k, d in run.tune.dimensions().items() if k in STEP_KEYS}
    base = run.model_dump(mode="json", exclude={"tune"})
    longest = 1
    for corner in itertools.product(*dims.values()):
        longest = max(longest, planned_steps(trial_config(base, dict(zip(dims, corner)), {}, None), n_train))
    return longest
