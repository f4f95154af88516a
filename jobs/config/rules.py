"""Cross-field rules: settings that are each valid but do not work together.

Each rule returns one problem (field, value, fix) or None; `problems` runs them all, so a config
reports everything that is wrong with it at once.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from jobs.config.errors import problem
from jobs.config.keys import all_keys, field_at, set_dotted
from jobs.config.names import ADAPTER_NAME, TARGET_SETS, TASK_METRIC_NAMES, TUNE_SHORTCUTS

if TYPE_CHECKING:  # the schema runs these rules, so they reach it through the config they check
    from jobs.config.schema import RunConfig


def read_deepspeed(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """A `training.deepspeed` value as a dict: the inline dict, or the file read (None when unset or the file is missing)."""
    if isinstance(value, str):
        path = Path(value)
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None  # JSON is YAML
    return value


def _rule_zero3_with_kbit(cfg: RunConfig) -> str | None:
    ds = read_deepspeed(cfg.training.deepspeed) or {}
    if cfg.quantization.mode != "none" and int(ds.get("zero_optimization", {}).get("stage", 0)) == 3:
        return problem("training.deepspeed", "ZeRO stage 3", f"ZeRO-3 cannot shard {cfg.quantization.mode} bitsandbytes weights; use ZeRO stage 2, or set quantization.mode=none")
    return None


def _rule_deepspeed_usable(cfg: RunConfig) -> str | None:
    if cfg.training.deepspeed is None:
        return None
    if importlib.util.find_spec("deepspeed") is None:
        return problem("training.deepspeed", cfg.training.deepspeed, "DeepSpeed is not installed: pip install --no-build-isolation 'deepspeed>=0.19,<0.20', or remove training.deepspeed")
    if read_deepspeed(cfg.training.deepspeed) is None:
        return problem("training.deepspeed", cfg.training.deepspeed, "file not found; give an existing DeepSpeed JSON/YAML path or an inline dict")
    return None


def _rule_deepspeed_agrees_with_training(cfg: RunConfig) -> str | None:
    """The Trainer fills DeepSpeed's batch and clipping keys from `training.*`; a different explicit value fails in the workers."""
    ds, t = read_deepspeed(cfg.training.deepspeed) or {}, cfg.training
    owned = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm,
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * cfg.ray.num_workers,
    }
    clashes = [f"{key}={ds[key]!r} (training.* gives {value})" for key, value in owned.items() if ds.get(key, "auto") not in ("auto", value)]
    if clashes:
        return problem("training.deepspeed", ", ".join(clashes), 'the Trainer sets these from training.* and ray.num_workers; write "auto" or leave them out')
    return None


def _rule_device_map(cfg: RunConfig) -> str | None:
    if cfg.model.device_map is not None:
        return problem("model.device_map", cfg.model.device_map, "training runs in Ray workers, each placing the model on its own device; remove model.device_map (use ray.num_workers / ray.use_gpu)")
    return None


def _rule_fp16_on_cpu(cfg: RunConfig) -> str | None:
    if not cfg.ray.use_gpu and cfg.training.precision == "fp16":
        return problem("training.precision", "fp16", "fp16 mixed precision needs a GPU; use precision=auto (fp32 on CPU) or bf16, or set ray.use_gpu=true")
    if not cfg.ray.use_gpu and cfg.quantization.compute_dtype == "float16":
        return problem("quantization.compute_dtype", "float16", "float16 matmuls are GPU-only; use compute_dtype=auto or float32 on CPU")
    return None


def _rule_gpu_resources(cfg: RunConfig) -> str | None:
    gpus = cfg.ray.resources_per_worker.get("GPU", 0)
    if gpus and not cfg.ray.use_gpu:
        return problem("ray.resources_per_worker.GPU", gpus, "set ray.use_gpu=true too, or drop GPU from resources_per_worker")
    return None


def _rule_quant_type_needs_4bit(cfg: RunConfig) -> str | None:
    if cfg.quantization.mode != "4bit" and cfg.quantization.quant_type != "nf4":
        return problem("quantization.quant_type", cfg.quantization.quant_type, "quant_type applies to 4-bit only; set quantization.mode=4bit or leave quant_type at nf4")
    return None


def _rule_steps(cfg: RunConfig) -> str | None:
    if cfg.training.max_steps == 0 or cfg.training.max_steps < -1:
        return problem("training.max_steps", cfg.training.max_steps, "use a positive step count, or -1 to train for training.num_epochs")
    return None


def _rule_ray_data_sampling(cfg: RunConfig) -> str | None:
    if cfg.data.loader == "ray_data" and cfg.training.group_by_length:
        return problem("training.group_by_length", True, "the length-grouped sampler needs the whole dataset in each worker; with data.loader: ray_data use training.packing: padding_free to cut padding, or data.loader: driver")
    return None


def _rule_lora_targets(cfg: RunConfig) -> str | None:
    if isinstance(cfg.lora.target_modules, list) and not cfg.lora.target_modules:
        return problem("lora.target_modules", [], "name at least one module (e.g. [q_proj, v_proj]) or use 'all-linear'")
    return None


def _rule_template_uses_columns(cfg: RunConfig) -> str | None:
    if cfg.data.prompt_template is not None and "{" not in cfg.data.prompt_template:
        return problem("data.prompt_template", cfg.data.prompt_template, "the template names no column; use placeholders such as '{question}'")
    return None


def _rule_roles(cfg: RunConfig) -> str | None:
    unknown = {k: v for k, v in cfg.data.roles.items() if v not in ("system", "user", "assistant", "tool")}
    if unknown:
        return problem("data.roles", unknown, "map each ShareGPT name to one of system, user, assistant, tool")
    return None


def _rule_json_schema(cfg: RunConfig) -> str | None:
    schema = cfg.eval.json_schema
    if schema is not None and "json" not in cfg.eval.metrics:
        return problem("eval.json_schema", schema, "a schema is only used by the json metric; add json to eval.metrics")
    if isinstance(schema, str) and not Path(schema).is_file():
        return problem("eval.json_schema", schema, "file not found; give a JSON schema file or an inline mapping")
    return None


def _rule_metrics_in_training_need_metrics(cfg: RunConfig) -> str | None:
    if cfg.eval.during_training_samples and not cfg.eval.metrics:
        return problem("eval.during_training_samples", cfg.eval.during_training_samples, "set eval.metrics (e.g. [squad]) to compute task metrics during training, or set it to 0")
    return None


def _rule_tune_metric(cfg: RunConfig) -> str | None:
    t = cfg.tune
    reported = ["eval_loss"] + [f"eval_{name}" for m in cfg.eval.metrics for name in TASK_METRIC_NAMES[m]]
    if t.metric not in reported:
        return problem("tune.metric", t.metric, f"not reported during training with these eval settings; use one of {', '.join(reported)} (task metrics need eval.metrics)")
    if t.metric != "eval_loss" and not cfg.eval.during_training_samples:
        return problem("tune.metric", t.metric, "task metrics reach Tune only when generated at each evaluation; set eval.during_training_samples (e.g. 32)")
    if cfg.data.validation_fraction == 0 and cfg.data.eval_path is None:
        return problem("tune.metric", t.metric, "a sweep needs evaluation data; set data.validation_fraction > 0 or data.eval_path")
    return None


def _rule_grid_needs_lists(cfg: RunConfig) -> str | None:
    if cfg.tune.search_alg != "grid":
        return None
    ranged = [key for key, dim in cfg.tune.dimensions().items() if dim.kind not in ("choice", "grid")]
    if ranged:
        return problem("tune.search_alg", "grid", f"grid search needs listed values, but {', '.join(ranged)} are ranges; list values (choice/grid) or use search_alg=random/optuna")
    return None


def _rule_shortcut_duplicates(cfg: RunConfig) -> str | None:
    t = cfg.tune
    doubled = [key for key, shortcut in TUNE_SHORTCUTS.items() if getattr(t, shortcut) is not None and key in t.space]
    if doubled:
        return problem("tune.space", doubled, "these keys are already searched by a tune shortcut (learning_rate, lora_r, target_modules); keep one of the two")
    if t.lora_r is not None and t.lora_alpha_ratio is not None and "lora.alpha" in t.space:
        return problem("tune.space.lora.alpha", t.space["lora.alpha"].model_dump(exclude_none=True), "alpha is tied to r by tune.lora_alpha_ratio; set lora_alpha_ratio=null to search it")
    return None


def _rule_serve_adapters(cfg: RunConfig) -> str | None:
    bad = [name for name in cfg.serve.adapters if not ADAPTER_NAME.match(name)]
    if bad:
        return problem("serve.adapters", bad, "adapter names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; rename them")
    clash = [name for name in cfg.serve.adapters if name == cfg.serve.model_name]
    if clash:
        return problem("serve.adapters", clash, "an adapter cannot share serve.model_name (the base model's name); rename one")
    return None


def _rule_serve_replicas(cfg: RunConfig) -> str | None:
    s = cfg.serve
    if s.min_replicas > s.max_replicas:
        return problem("serve.min_replicas", s.min_replicas, f"above serve.max_replicas ({s.max_replicas}); lower it or raise max_replicas")
    if s.initial_replicas is not None and not s.min_replicas <= s.initial_replicas <= s.max_replicas:
        return problem("serve.initial_replicas", s.initial_replicas, f"must lie within min_replicas..max_replicas ({s.min_replicas}..{s.max_replicas})")
    return None


def _rule_serve_token_limits(cfg: RunConfig) -> str | None:
    s = cfg.serve
    if s.default_max_tokens > s.max_tokens_limit:
        return problem("serve.default_max_tokens", s.default_max_tokens, f"above serve.max_tokens_limit ({s.max_tokens_limit}); lower it or raise the limit")
    return None


def _rule_serve_vllm_precision(cfg: RunConfig) -> str | None:
    s = cfg.serve
    if s.engine == "vllm" and s.quantization in ("4bit", "8bit"):
        return problem("serve.quantization", s.quantization, "serve.engine=vllm serves the base unquantized (bf16) with the adapter on top; set serve.quantization=none, or serve.engine=hf for a bitsandbytes base")
    return None


def _rule_serve_batches_can_fill(cfg: RunConfig) -> str | None:
    s = cfg.serve
    if s.max_ongoing_requests < s.max_batch_size:
        return problem("serve.max_ongoing_requests", s.max_ongoing_requests, f"below serve.max_batch_size ({s.max_batch_size}), so batches could never fill; raise it to at least {s.max_batch_size}")
    return None


def _rule_tracking_uri_without_credentials(cfg: RunConfig) -> str | None:
    uri = cfg.tracking.mlflow_tracking_uri or ""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        shown = f"{scheme}://***@{rest.split('@', 1)[1]}"  # never echo the credentials
        return problem("tracking.mlflow_tracking_uri", shown, "credentials in the URI would be saved with the run's config; put them in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) and drop them from the URI")
    return None


def _rule_tracking_packages(cfg: RunConfig) -> str | None:
    missing = [name for name in cfg.tracking.backends if importlib.util.find_spec(name) is None]
    if missing:
        return problem("tracking.backends", cfg.tracking.backends, f"{', '.join(missing)} not installed: pip install -e '.[tracking]', or drop {', '.join(missing)} from tracking.backends")
    return None


def _rule_search_space(cfg: RunConfig) -> list[str]:
    """Every searched key exists, and every candidate value makes a valid config."""
    problems = []
    base = cfg.model_dump(mode="json", exclude={"tune"})
    for key, dim in cfg.tune.dimensions().items():
        field, label = field_at(type(cfg), key), cfg.tune.label(key)
        if key.startswith("tune.") or field is None:
            close = difflib.get_close_matches(key, all_keys(type(cfg)), n=1)
            problems.append(problem(label, dim.model_dump(exclude_none=True), f"unknown config key; {f'did you mean {close[0]!r}?' if close else 'use a dotted key such as training.learning_rate'}"))
            continue
        if field.annotation is int and dim.kind in ("uniform", "loguniform"):
            problems.append(problem(label, dim.model_dump(exclude_none=True), "an integer setting; use randint or choice"))
            continue
        if key == "lora.target_modules":
            problems += [problem("tune.target_modules", v, f"unknown target set; use one of {', '.join(TARGET_SETS)}, or a list of module names") for v in dim.candidates() if isinstance(v, str) and v not in TARGET_SETS]
            continue
        for value in dim.candidates():
            trial = copy.deepcopy(base)
            set_dotted(trial, key, value)
            try:
                type(cfg).model_validate(trial)
            except ValidationError as exc:
                reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                problems.append(problem(label, value, f"this value makes an invalid run config ({reason}); change the search space"))
    return problems


def _rule_promote_metric(cfg: RunConfig) -> str | None:
    computed = ["eval_loss", "perplexity"] + [name for m in cfg.eval.metrics for name in TASK_METRIC_NAMES[m]]
    if cfg.promote.metric not in computed:
        return problem("promote.metric", cfg.promote.metric, f"the evaluation does not compute it with these settings; use one of {', '.join(computed)} (task metrics need eval.metrics)")
    if cfg.promote.name is not None and not ADAPTER_NAME.match(cfg.promote.name):
        return problem("promote.name", cfg.promote.name, "1-64 letters, digits, '.', '_' or '-'; pick such a name")
    return None


CROSS_FIELD_RULES = (
    _rule_promote_metric,
    _rule_ray_data_sampling,
    _rule_roles,
    _rule_tracking_uri_without_credentials,
    _rule_tracking_packages,
    _rule_serve_adapters,
    _rule_serve_replicas,
    _rule_serve_token_limits,
    _rule_serve_batches_can_fill,
    _rule_serve_vllm_precision,
    _rule_zero3_with_kbit,
    _rule_deepspeed_usable,
    _rule_deepspeed_agrees_with_training,
    _rule_device_map,
    _rule_fp16_on_cpu,
    _rule_gpu_resources,
    _rule_quant_type_needs_4bit,
    _rule_steps,
    _rule_lora_targets,
    _rule_template_uses_columns,
    _rule_json_schema,
    _rule_metrics_in_training_need_metrics,
)


def problems(cfg: RunConfig) -> list[str]:
    """Every cross-field problem of a config; one written for a sweep is checked as one."""
    found = [p for rule in CROSS_FIELD_RULES if (p := rule(cfg))]
    return found + (sweep_problems(cfg) if cfg.is_sweep else [])


def sweep_problems(cfg: RunConfig) -> list[str]:
    """The tune section's rules; `lorafleet sweep` applies them even when the section is all defaults."""
    problems = [p for rule in (_rule_tune_metric, _rule_grid_needs_lists, _rule_shortcut_duplicates) if (p := rule(cfg))]
    return problems + _rule_search_space(cfg)
