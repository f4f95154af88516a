"""The whole run configuration: one YAML file, one pydantic model.

`load_config(path, overrides)` is the only entry point: it reads the YAML, applies dotted
`key=value` overrides, validates everything and raises `ConfigError` listing every problem
at once (field, value, fix) before anything touches Ray.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

PACKAGED_MODELS = ("smollm2-135m-instruct",)
# Task metric names each eval.metrics entry reports (as eval_<name> during training).
TASK_METRIC_NAMES = {"squad": ("exact_match", "f1"), "rouge": ("rouge1", "rouge2", "rougeL"), "json": ("json_valid", "json_schema_valid")}
TARGET_SETS = ("attention", "mlp", "attention+mlp", "all-linear")
# Config key -> the tune: field that searches it without a `space:` entry.
TUNE_SHORTCUTS = {"training.learning_rate": "learning_rate", "lora.r": "lora_r", "lora.target_modules": "target_modules"}
PAGED_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit")
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "adafactor", "sgd", *PAGED_OPTIMIZERS)
# A served adapter name: one path component, so a name can never reach outside the adapter root.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field("smollm2-135m-instruct", description="Hub id, local folder, or 'smollm2-135m-instruct' (offline, packaged).")
    kind: Literal["auto", "causal", "seq2seq"] = Field("auto", description="Architecture family; 'auto' reads it from the model config.")
    chat_template: Literal["auto"] | bool = Field("auto", description="Wrap prompts in the tokenizer's chat template: true, false, or 'auto' (when it has one).")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint; off unless you trust its author.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    device_map: str | None = Field(None, description="Only for single-process use; Ray workers place the model on their own device.")


class QuantizationConfig(Section):
    mode: Literal["none", "4bit", "8bit"] = Field("4bit", description="Load the frozen base in 4-bit (QLoRA), 8-bit, or full precision.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Dtype of 4-bit matmuls; 'auto': bfloat16 on GPU, float32 on CPU.")


class LoraConfig(Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Module names to adapt, or 'all-linear'.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")


class DataConfig(Section):
    path: str = Field("demo", description="JSONL/CSV/Parquet/SQuAD JSON file, dataset folder, hub dataset id, or 'demo' (generated).")
    format: Literal["auto", "jsonl", "csv", "parquet", "squad", "hf"] = Field("auto", description="Input format; 'auto' from the file extension.")
    split: str = Field("train", description="Split to read from a hub dataset or dataset folder.")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename columns: {name in file: name used in templates}.")
    prompt_template: str | None = Field(None, description="Format string over the row's columns, e.g. 'Q: {question}'; default '{input}' (SQuAD: context + question).")
    target_column: str | None = Field(None, description="Column holding the expected output; default 'output' (SQuAD: 'answer').")
    system_prompt: str | None = Field(None, description="System message added when the chat template is used.")
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows held out for evaluation (seeded split).")
    max_samples: int | None = Field(None, gt=0, description="Use only the first N valid rows (quick experiments).")
    max_source_length: int = Field(256, gt=0, description="Prompt tokens kept (longer prompts are truncated and counted).")
    max_target_length: int = Field(128, gt=0, description="Target tokens kept (longer targets are truncated and counted).")
    bad_rows: Literal["fail", "skip"] = Field("fail", description="Rows with missing/empty fields: stop with their row numbers, or skip and report them.")
    eval_path: str | None = Field(None, description="Evaluate on this file (same format) instead of the held-out split.")
    demo_rows: int = Field(400, gt=0, description="Rows generated when path is 'demo'.")
    seed: int = Field(42, description="Seed of the train/validation split and demo generator.")


class TrainingConfig(Section):
    output_dir: str = Field("runs/demo", description="Where the adapter, tokenizer, metrics and report are written.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training set (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps to run; -1 means use num_epochs.")
    batch_size: int = Field(4, gt=0, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    optimizer: Literal[OPTIMIZERS] = Field("adamw_torch", description="Optimizer; paged/8-bit ones come from bitsandbytes.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 disables).")
    eval_steps: int = Field(50, gt=0, description="Evaluate, checkpoint and report to Ray every N steps.")
    logging_steps: int = Field(10, gt=0, description="Log the training loss every N steps.")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept in Ray storage (the latest is always kept).")
    seed: int = Field(42, description="Seed of model init, dropout and data order.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Mixed precision; 'auto': bf16 on GPU, fp32 on CPU.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward (non-reentrant, DDP-safe).")
    deepspeed: str | dict[str, Any] | None = Field(None, description="DeepSpeed config (file path or inline dict); ZeRO-2 works with 4-bit.")
    dataloader_workers: int = Field(0, ge=0, description="DataLoader worker processes per Ray worker.")


class EvalConfig(Section):
    metrics: list[Literal["squad", "rouge", "json"]] = Field(default_factory=list, description="Task metrics besides eval loss/perplexity: squad (EM/F1), rouge, json.")
    max_new_tokens: int = Field(64, gt=0, le=4096, description="Tokens generated per example (never max_length: long prompts would leave no room).")
    num_beams: int = Field(1, gt=0, description="Beam search width; 1 is greedy.")
    do_sample: bool = Field(False, description="Sample instead of greedy/beam decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    stop: list[str] = Field(default_factory=list, description="Stop strings: generation ends at the first, which is cut from the output.")
    batch_size: int = Field(8, gt=0, description="Examples generated per batch (left-padded for causal models).")
    during_training_samples: int = Field(0, ge=0, description="Validation examples generated at each evaluation to report task metrics to Ray (0: loss only).")
    json_schema: str | dict[str, Any] | None = Field(None, description="JSON schema (file or inline) for the json metric's compliance rate.")
    report_samples: int = Field(5, ge=0, description="Sample predictions shown side by side in eval.md.")
    seed: int = Field(42, description="Seed for sampled generation.")


class RayConfig(Section):
    address: str | None = Field(None, description="Cluster address; empty: RAY_ADDRESS, else an embedded local Ray.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (one process and one device each).")
    use_gpu: bool = Field(False, description="Give each worker one GPU.")
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1}, description="Ray resources per worker, e.g. {CPU: 4, GPU: 1}.")
    storage_path: str = Field("runs/ray", description="Checkpoints; with an s3:// or gs:// URI also a copy of each finished output folder.")
    max_failures: int = Field(0, ge=-1, description="Worker failures to recover from by resuming the latest checkpoint (-1: unlimited).")
    name: str | None = Field(None, description="Run name in storage; default: the output folder's name.")


class SearchDimension(Section):
    """One searched key: exactly one of the distributions below."""

    choice: list[Any] | None = Field(None, description="Pick among these values (random/Optuna); a grid axis under search_alg=grid.")
    grid: list[Any] | None = Field(None, description="Try every value (Tune grid search; multiplies the trials).")
    uniform: tuple[float, float] | None = Field(None, description="[low, high] sampled uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high] sampled uniformly in log space (low > 0).")
    randint: tuple[int, int] | None = Field(None, description="[low, high] integers, both ends included.")

    @model_validator(mode="after")
    def _one_distribution(self) -> SearchDimension:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, grid, uniform, loguniform, randint (got {', '.join(given) or 'none'})")
        values = getattr(self, given[0])
        if given[0] in ("choice", "grid") and not values:
            raise ValueError(f"{given[0]} is empty; list at least one value")
        if given[0] in ("uniform", "loguniform", "randint") and values[0] >= values[1]:
            raise ValueError(f"lower bound {values[0]} is not below upper bound {values[1]}; write [low, high] with low < high, or fix the value outside tune")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform needs a positive lower bound (got {values[0]}); use uniform, or a bound such as 1e-6")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    def candidates(self) -> list[Any]:
        """Values that must each make a valid run config: every choice, or both bounds."""
        return list(getattr(self, self.kind))


class TuneSection(Section):
    output_dir: str = Field("runs/sweep", description="Sweep folder: leaderboard, curves, TensorBoard logs, trial checkpoints, best/.")
    metric: str = Field("eval_loss", description="Metric to optimize: eval_loss, or a task metric reported during training (eval_f1, eval_rougeL, ...).")
    mode: Literal["auto", "min", "max"] = Field("auto", description="Optimize direction; 'auto': min for losses, max otherwise.")
    num_samples: int = Field(8, gt=0, description="Trials to sample; with search_alg=grid, passes over the whole grid (1 unless set).")
    search_alg: Literal["random", "grid", "optuna"] = Field("random", description="random (Tune's sampler), grid (every combination), or optuna (TPE).")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops poor trials early at rungs; fifo runs every trial to the end.")
    grace_period: int | None = Field(None, gt=0, description="ASHA: steps before a trial can be stopped; default training.eval_steps (the first evaluation).")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: keep the best 1/factor of trials at each rung.")
    time_budget_s: float | None = Field(None, gt=0, description="Stop starting/running trials after this many seconds (finished ones stay on the leaderboard).")
    max_concurrent_trials: int | None = Field(None, gt=0, description="Trials at once; default: what the cluster's resources fit given ray.num_workers x resources_per_worker.")
    trial_retries: int = Field(1, ge=0, description="Times a failed trial is retried (each retry resumes from its latest checkpoint).")
    seed: int = Field(42, description="Seed of the search algorithm: the same seed samples the same trials.")
    learning_rate: tuple[float, float] | None = Field(None, description="Shortcut: training.learning_rate loguniform over [low, high].")
    lora_r: list[int] | None = Field(None, description="Shortcut: lora.r chosen among these ranks.")
    lora_alpha_ratio: float | None = Field(2.0, gt=0, description="With lora_r: lora.alpha = ratio x r; null keeps lora.alpha (or search it in space).")
    target_modules: list[str | list[str]] | None = Field(None, description="Shortcut: lora.target_modules among named sets (attention, mlp, attention+mlp, all-linear) or explicit lists.")
    space: dict[str, SearchDimension] = Field(default_factory=dict, description="Any other dotted config key -> distribution, e.g. {lora.dropout: {choice: [0.0, 0.1]}}.")

    @field_validator("learning_rate")
    @classmethod
    def _learning_rate_range(cls, value):
        if value is not None:
            try:
                SearchDimension(loguniform=value)  # same bound checks as tune.space
            except ValidationError as exc:
                raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return value

    @field_validator("lora_r", "target_modules")
    @classmethod
    def _non_empty(cls, value):
        if value is not None and not value:
            raise ValueError("empty list; give at least one value, or null to leave it unsearched")
        return value

    def dimensions(self) -> dict[str, SearchDimension]:
        """The whole search space, shortcuts included, keyed by dotted config key."""
        dims = dict(self.space)
        if self.learning_rate is not None:
            dims["training.learning_rate"] = SearchDimension(loguniform=self.learning_rate)
        if self.lora_r is not None:
            dims["lora.r"] = SearchDimension(choice=self.lora_r)
        if self.target_modules is not None:
            dims["lora.target_modules"] = SearchDimension(choice=self.target_modules)
        return dims

    @staticmethod
    def label(key: str) -> str:
        """How the config file names the setting that searches `key`."""
        return f"tune.{TUNE_SHORTCUTS[key]}" if key in TUNE_SHORTCUTS else f"tune.space.{key}"

    def trials_to_sample(self) -> int:
        """Tune's num_samples: under grid search it repeats the grid, so it defaults to one pass."""
        return self.num_samples if self.search_alg != "grid" or "num_samples" in self.model_fields_set else 1

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "min" if self.metric.endswith("loss") else "max"


class ServeSection(Section):
    name: str = Field("lorafleet", description="Serve application name (also its name in `serve status`).")
    host: str = Field("127.0.0.1", description="HTTP host of Serve's proxy; 0.0.0.0 to listen on every interface.")
    port: int = Field(8000, gt=0, lt=65536, description="HTTP port of Serve's proxy.")
    route_prefix: str = Field("/", description="URL prefix of the API (routes are <prefix>v1/...).")
    model_name: str | None = Field(None, description="Name clients use for the base model without adapter; default: the model folder's or hub id's last part.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Named adapters: {name: PEFT folder or s3:// / gs:// URI}, e.g. {squad: runs/squad-sweep/best/adapter}.")
    adapter_root: str | None = Field(None, description="Registry folder, one subfolder per adapter; a folder added there is servable without redeploying.")
    max_adapters_per_replica: int = Field(8, gt=0, description="Adapters kept loaded per replica (least recently used is unloaded).")
    quantization: Literal["as_trained", "none", "4bit", "8bit"] = Field("as_trained", description="Base model precision in replicas; 'as_trained' uses quantization.mode.")
    max_batch_size: int = Field(16, gt=0, description="Requests generated together in one forward pass (1 turns batching off).")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="How long a batch waits to fill before it runs.")
    default_max_tokens: int = Field(128, gt=0, description="max_tokens of a request that sets none.")
    max_tokens_limit: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for (larger is a 400 that says so).")
    max_concurrent_requests: int = Field(64, gt=0, description="Requests in flight per API replica before overload applies.")
    overload: Literal["reject", "queue"] = Field("reject", description="Past max_concurrent_requests: answer 429 at once, or queue until a slot frees.")
    replica_loss_retries: int = Field(2, ge=0, le=10, description="Times a request is sent again when its model replica dies before answering (0: fail it).")
    api_key: SecretStr | None = Field(None, description="Bearer token required on every route but /healthz (prefer api_key_env: files get shared).")
    api_key_env: str = Field("LORAFLEET_API_KEY", description="Environment variable holding the bearer token; used when api_key is unset.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling: fewest model replicas.")
    max_replicas: int = Field(1, gt=0, description="Autoscaling: most model replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Autoscaling: replicas at deploy time; default min_replicas.")
    target_ongoing_requests: float = Field(8, gt=0, description="Autoscaling: ongoing requests per replica that Serve aims for.")
    upscale_delay_s: float = Field(5, ge=0, description="Autoscaling: load must stay high this long before adding replicas.")
    downscale_delay_s: float = Field(30, ge=0, description="Autoscaling: load must stay low this long before removing replicas.")
    max_ongoing_requests: int = Field(64, gt=0, description="Requests one model replica accepts at once (at least max_batch_size, or batches never fill).")
    replica_resources: dict[str, float] = Field(default_factory=lambda: {"CPU": 1}, description="Ray resources per model replica, e.g. {CPU: 4, GPU: 1}.")
    api_replicas: int = Field(1, gt=0, description="Replicas of the HTTP front (validation, auth, streaming); it holds no model.")

    def bearer_token(self) -> str | None:
        """The API key in force here: serve.api_key, else the variable named by api_key_env."""
        return self.api_key.get_secret_value() if self.api_key else os.environ.get(self.api_key_env) or None


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig, description="bitsandbytes quantization of the frozen base.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Hugging Face Trainer settings.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray Train scaling and storage.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Generation and task metrics for evaluation.")
    tune: TuneSection = Field(default_factory=TuneSection, description="Ray Tune sweep (lorafleet sweep): search space, metric, scheduler.")
    serve: ServeSection = Field(default_factory=ServeSection, description="Ray Serve deployment (lorafleet serve): adapters, batching, autoscaling, API limits.")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> RunConfig:
        problems = [p for rule in CROSS_FIELD_RULES if (p := rule(self))]
        if "tune" in self.model_fields_set:  # a config written for sweeps is checked as one
            problems += sweep_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _problem(field: str, value: Any, fix: str) -> str:
    return f"{field} = {value!r}: {fix}"


def read_deepspeed(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """A `training.deepspeed` value as a dict: the inline dict, or the file read (None when unset or the file is missing)."""
    if isinstance(value, str):
        path = Path(value)
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None  # JSON is YAML
    return value


def _rule_zero3_with_kbit(cfg: RunConfig) -> str | None:
    ds = read_deepspeed(cfg.training.deepspeed) or {}
    if cfg.quantization.mode != "none" and int(ds.get("zero_optimization", {}).get("stage", 0)) == 3:
        return _problem("training.deepspeed", "ZeRO stage 3", f"ZeRO-3 cannot shard {cfg.quantization.mode} bitsandbytes weights; use ZeRO stage 2, or set quantization.mode=none")
    return None


def _rule_deepspeed_usable(cfg: RunConfig) -> str | None:
    if cfg.training.deepspeed is None:
        return None
    if importlib.util.find_spec("deepspeed") is None:
        return _problem("training.deepspeed", cfg.training.deepspeed, "DeepSpeed is not installed: pip install --no-build-isolation 'deepspeed>=0.19,<0.20', or remove training.deepspeed")
    if read_deepspeed(cfg.training.deepspeed) is None:
        return _problem("training.deepspeed", cfg.training.deepspeed, "file not found; give an existing DeepSpeed JSON/YAML path or an inline dict")
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
        return _problem("training.deepspeed", ", ".join(clashes), 'the Trainer sets these from training.* and ray.num_workers; write "auto" or leave them out')
    return None


def _rule_device_map(cfg: RunConfig) -> str | None:
    if cfg.model.device_map is not None:
        return _problem("model.device_map", cfg.model.device_map, "training runs in Ray workers, each placing the model on its own device; remove model.device_map (use ray.num_workers / ray.use_gpu)")
    return None


def _rule_fp16_on_cpu(cfg: RunConfig) -> str | None:
    if not cfg.ray.use_gpu and cfg.training.precision == "fp16":
        return _problem("training.precision", "fp16", "fp16 mixed precision needs a GPU; use precision=auto (fp32 on CPU) or bf16, or set ray.use_gpu=true")
    if not cfg.ray.use_gpu and cfg.quantization.compute_dtype == "float16":
        return _problem("quantization.compute_dtype", "float16", "float16 matmuls are GPU-only; use compute_dtype=auto or float32 on CPU")
    return None


def _rule_gpu_resources(cfg: RunConfig) -> str | None:
    gpus = cfg.ray.resources_per_worker.get("GPU", 0)
    if gpus and not cfg.ray.use_gpu:
        return _problem("ray.resources_per_worker.GPU", gpus, "set ray.use_gpu=true too, or drop GPU from resources_per_worker")
    return None


def _rule_quant_type_needs_4bit(cfg: RunConfig) -> str | None:
    if cfg.quantization.mode != "4bit" and cfg.quantization.quant_type != "nf4":
        return _problem("quantization.quant_type", cfg.quantization.quant_type, "quant_type applies to 4-bit only; set quantization.mode=4bit or leave quant_type at nf4")
    return None


def _rule_steps(cfg: RunConfig) -> str | None:
    if cfg.training.max_steps == 0 or cfg.training.max_steps < -1:
        return _problem("training.max_steps", cfg.training.max_steps, "use a positive step count, or -1 to train for training.num_epochs")
    return None


def _rule_lora_targets(cfg: RunConfig) -> str | None:
    if isinstance(cfg.lora.target_modules, list) and not cfg.lora.target_modules:
        return _problem("lora.target_modules", [], "name at least one module (e.g. [q_proj, v_proj]) or use 'all-linear'")
    return None


def _rule_template_uses_columns(cfg: RunConfig) -> str | None:
    if cfg.data.prompt_template is not None and "{" not in cfg.data.prompt_template:
        return _problem("data.prompt_template", cfg.data.prompt_template, "the template names no column; use placeholders such as '{question}'")
    return None


def _rule_json_schema(cfg: RunConfig) -> str | None:
    schema = cfg.eval.json_schema
    if schema is not None and "json" not in cfg.eval.metrics:
        return _problem("eval.json_schema", schema, "a schema is only used by the json metric; add json to eval.metrics")
    if isinstance(schema, str) and not Path(schema).is_file():
        return _problem("eval.json_schema", schema, "file not found; give a JSON schema file or an inline mapping")
    return None


def _rule_metrics_in_training_need_metrics(cfg: RunConfig) -> str | None:
    if cfg.eval.during_training_samples and not cfg.eval.metrics:
        return _problem("eval.during_training_samples", cfg.eval.during_training_samples, "set eval.metrics (e.g. [squad]) to compute task metrics during training, or set it to 0")
    return None


def _rule_tune_metric(cfg: RunConfig) -> str | None:
    t = cfg.tune
    reported = ["eval_loss"] + [f"eval_{name}" for m in cfg.eval.metrics for name in TASK_METRIC_NAMES[m]]
    if t.metric not in reported:
        return _problem("tune.metric", t.metric, f"not reported during training with these eval settings; use one of {', '.join(reported)} (task metrics need eval.metrics)")
    if t.metric != "eval_loss" and not cfg.eval.during_training_samples:
        return _problem("tune.metric", t.metric, "task metrics reach Tune only when generated at each evaluation; set eval.during_training_samples (e.g. 32)")
    if cfg.data.validation_fraction == 0 and cfg.data.eval_path is None:
        return _problem("tune.metric", t.metric, "a sweep needs evaluation data; set data.validation_fraction > 0 or data.eval_path")
    return None


def _rule_grid_needs_lists(cfg: RunConfig) -> str | None:
    if cfg.tune.search_alg != "grid":
        return None
    ranged = [key for key, dim in cfg.tune.dimensions().items() if dim.kind not in ("choice", "grid")]
    if ranged:
        return _problem("tune.search_alg", "grid", f"grid search needs listed values, but {', '.join(ranged)} are ranges; list values (choice/grid) or use search_alg=random/optuna")
    return None


def _rule_shortcut_duplicates(cfg: RunConfig) -> str | None:
    t = cfg.tune
    doubled = [key for key, shortcut in TUNE_SHORTCUTS.items() if getattr(t, shortcut) is not None and key in t.space]
    if doubled:
        return _problem("tune.space", doubled, "these keys are already searched by a tune shortcut (learning_rate, lora_r, target_modules); keep one of the two")
    if t.lora_r is not None and t.lora_alpha_ratio is not None and "lora.alpha" in t.space:
        return _problem("tune.space.lora.alpha", t.space["lora.alpha"].model_dump(exclude_none=True), "alpha is tied to r by tune.lora_alpha_ratio; set lora_alpha_ratio=null to search it")
    return None


def _rule_serve_adapters(cfg: RunConfig) -> str | None:
    bad = [name for name in cfg.serve.adapters if not ADAPTER_NAME.match(name)]
    if bad:
        return _problem("serve.adapters", bad, "adapter names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; rename them")
    clash = [name for name in cfg.serve.adapters if name == cfg.serve.model_name]
    if clash:
        return _problem("serve.adapters", clash, "an adapter cannot share serve.model_name (the base model's name); rename one")
    return None


def _rule_serve_replicas(cfg: RunConfig) -> str | None:
    s = cfg.serve
    if s.min_replicas > s.max_replicas:
        return _problem("serve.min_replicas", s.min_replicas, f"above serve.max_replicas ({s.max_replicas}); lower it or raise max_replicas")
    if s.initial_replicas is not None and not s.min_replicas <= s.initial_replicas <= s.max_replicas:
        return _problem("serve.initial_replicas", s.initial_replicas, f"must lie within min_replicas..max_replicas ({s.min_replicas}..{s.max_replicas})")
    return None


def _rule_serve_token_limits(cfg: RunConfig) -> str | None:
    s = cfg.serve
    if s.default_max_tokens > s.max_tokens_limit:
        return _problem("serve.default_max_tokens", s.default_max_tokens, f"above serve.max_tokens_limit ({s.max_tokens_limit}); lower it or raise the limit")
    return None


def _rule_serve_batches_can_fill(cfg: RunConfig) -> str | None:
    s = cfg.serve
    if s.max_ongoing_requests < s.max_batch_size:
        return _problem("serve.max_ongoing_requests", s.max_ongoing_requests, f"below serve.max_batch_size ({s.max_batch_size}), so batches could never fill; raise it to at least {s.max_batch_size}")
    return None


def _section_model(parents: list[str] | tuple) -> type[BaseModel] | None:
    """The config section that the dotted path `parents` leads to, or None when it leads nowhere."""
    model: type[BaseModel] = RunConfig
    for part in parents:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _field_at(key: str) -> Any:
    """The pydantic field a dotted key names, or None when the key does not exist."""
    *parents, leaf = key.split(".")
    section = _section_model(parents)
    return section.model_fields.get(leaf) if section else None


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
    raw[leaf] = value


def _rule_search_space(cfg: RunConfig) -> list[str]:
    """Every searched key exists, and every candidate value makes a valid config."""
    problems = []
    base = cfg.model_dump(mode="json", exclude={"tune"})
    for key, dim in cfg.tune.dimensions().items():
        field, label = _field_at(key), cfg.tune.label(key)
        if key.startswith("tune.") or field is None:
            close = difflib.get_close_matches(key, _all_keys(), n=1)
            problems.append(_problem(label, dim.model_dump(exclude_none=True), f"unknown config key; {f'did you mean {close[0]!r}?' if close else 'use a dotted key such as training.learning_rate'}"))
            continue
        if field.annotation is int and dim.kind in ("uniform", "loguniform"):
            problems.append(_problem(label, dim.model_dump(exclude_none=True), "an integer setting; use randint or choice"))
            continue
        if key == "lora.target_modules":
            problems += [_problem("tune.target_modules", v, f"unknown target set; use one of {', '.join(TARGET_SETS)}, or a list of module names") for v in dim.candidates() if isinstance(v, str) and v not in TARGET_SETS]
            continue
        for value in dim.candidates():
            trial = copy.deepcopy(base)
            set_dotted(trial, key, value)
            try:
                RunConfig.model_validate(trial)
            except ValidationError as exc:
                reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                problems.append(_problem(label, value, f"this value makes an invalid run config ({reason}); change the search space"))
    return problems


def _all_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    model = model or RunConfig
    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _all_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


CROSS_FIELD_RULES = (
    _rule_serve_adapters,
    _rule_serve_replicas,
    _rule_serve_token_limits,
    _rule_serve_batches_can_fill,
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


def sweep_problems(cfg: RunConfig) -> list[str]:
    """The tune section's rules; `lorafleet sweep` applies them even when the section is all defaults."""
    problems = [p for rule in (_rule_tune_metric, _rule_grid_needs_lists, _rule_shortcut_duplicates) if (p := rule(cfg))]
    return problems + _rule_search_space(cfg)


class ConfigError(ValueError):
    """Every problem of one config, each naming the field, the value and the fix."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted `a.b.c=value` overrides; values are parsed as YAML (numbers, lists, bools)."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(_problem("override", item, "write overrides as dotted.key=value, e.g. training.learning_rate=1e-4"))
            continue
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(_problem(key, item, f"'{part}' is not a section, so it has no sub-keys"))
                break
            node = child
        else:
            try:
                node[leaf] = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError as exc:
                reason = str(exc).splitlines()[0]
                problems.append(_problem(key.strip(), value, f"not a YAML value ({reason}); quote the whole override in the shell, e.g. 'ray.resources_per_worker={{CPU: 4}}'"))
    if problems:
        raise ConfigError(problems, "overrides")
    return raw


def _known_keys(loc: tuple) -> list[str]:
    section = _section_model(loc[:-1])
    return list(section.model_fields) if section else []


def _describe(error: dict[str, Any]) -> list[str]:
    field = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        leaf = str(error["loc"][-1])
        known = _known_keys(error["loc"])
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
        return [_problem(field, error["input"], f"unknown key; {hint}")]
    if not field:  # cross-field rules: one line per problem
        return str(error["ctx"]["error"]).splitlines()
    message = error["msg"].removeprefix("Value error, ")
    return [_problem(field, error["input"], f"{message}")]


def validate(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [line for error in exc.errors() for line in _describe(error)]
        raise ConfigError(problems, source) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML (or start from defaults), apply overrides, validate: all errors at once."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError([_problem("--config", str(path), "file not found; pass an existing YAML file")], source) from None
        except yaml.YAMLError as exc:
            raise ConfigError([_problem("--config", str(path), f"not valid YAML: {exc}")], source) from None
        if not isinstance(raw, dict):
            raise ConfigError([_problem("--config", type(raw).__name__, "the file must be a YAML mapping of sections (model:, lora:, ...)")], source)
    return validate(apply_overrides(raw, list(overrides)), source)


PATH_FIELDS = ("model.name", "data.path", "data.eval_path", "eval.json_schema", "training.deepspeed", "training.output_dir", "ray.storage_path", "tune.output_dir", "serve.adapter_root")


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """The same config with relative local paths made absolute, for processes whose working
    directory is not the user's (Tune trials, Serve replicas). Hub ids and URIs stay as they are;
    what was left at its default stays unset (so defaults that depend on it still apply)."""
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    if cfg.serve.api_key is not None:  # a JSON dump masks secrets; this copy must keep working
        raw["serve"]["api_key"] = cfg.serve.api_key.get_secret_value()
    for key in PATH_FIELDS:
        section, leaf = key.split(".")
        if section == "tune" and "tune" not in cfg.model_fields_set:
            continue
        value = getattr(getattr(cfg, section), leaf)
        if isinstance(value, str) and "://" not in value and value != "demo" and (Path(value).exists() or leaf in ("output_dir", "storage_path")):
            raw.setdefault(section, {})[leaf] = str(Path(value).resolve())
    if cfg.serve.adapters:
        raw["serve"]["adapters"] = {name: path if "://" in path else str(Path(path).resolve()) for name, path in cfg.serve.adapters.items()}
    return RunConfig.model_validate(raw)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as saved with a run; secrets are left out (set them again where needed)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude={"serve": {"api_key"}}), sort_keys=False)
