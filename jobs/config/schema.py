"""The run configuration's schema: one pydantic model per YAML section, every field with a
default and a one-line description; `RunConfig` runs the cross-field rules on every validation."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from jobs.config import rules
from jobs.config.names import OPTIMIZERS, TUNE_SHORTCUTS


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
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Dtype of 4-bit matmuls; 'auto': bfloat16 on GPUs that have it, float16 on older GPUs, float32 on CPU.")


class LoraConfig(Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Module names to adapt, or 'all-linear'.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")


class DataConfig(Section):
    path: str = Field("demo", description="JSONL/CSV/Parquet/SQuAD JSON file, dataset folder, hub dataset id, or a generated task: 'demo', 'demo-chat'.")
    format: Literal["auto", "jsonl", "csv", "parquet", "squad", "hf", "messages", "sharegpt", "alpaca"] = Field("auto", description="File format, or the rows' shape (messages, sharegpt, alpaca: file type from the extension); 'auto': extension, then a messages/conversations column.")
    roles: dict[str, str] = Field(default_factory=lambda: {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool", "observation": "tool"}, description="ShareGPT 'from' names -> system/user/assistant/tool.")
    train_on: Literal["assistant", "last_assistant", "all"] = Field("assistant", description="Conversations: loss on every assistant turn, the last one only, or every token.")
    max_length: int = Field(1024, gt=0, description="Conversations: tokens per example, chat template included.")
    truncation: Literal["drop_oldest_turns", "skip", "fail"] = Field("drop_oldest_turns", description="Conversations over data.max_length: drop the oldest exchanges (system prompt kept), skip, or stop; counted in the report.")
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
    loader: Literal["driver", "ray_data"] = Field("driver", description="driver: read, check and tokenize in the driver, ship to the workers (small data); ray_data: on the cluster with Ray Data, each worker streams its shard (large data, s3:// folders).")


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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Mixed precision; 'auto': bf16 on GPUs that have it, fp16 on older GPUs (T4, V100), fp32 on CPU.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward (non-reentrant, DDP-safe).")
    deepspeed: str | dict[str, Any] | None = Field(None, description="DeepSpeed config (file path or inline dict); ZeRO-2 works with 4-bit.")
    dataloader_workers: int = Field(0, ge=0, description="DataLoader worker processes per Ray worker.")
    packing: Literal["none", "padding_free"] = Field("none", description="padding_free: each batch's examples end to end in rows twice its longest example wide, padding only at row ends (causal models; position ids keep them apart).")
    group_by_length: bool = Field(False, description="Batch examples of similar length together: less padding (HF's length-grouped sampler).")


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
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description="How the workers' bundles spread over nodes: STRICT_SPREAD puts each on its own node; PACK fills one node first.")
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
    adapter_root: str | None = Field(None, description="Adapter registry (`lorafleet registry`: a folder, s3:// or gs://), or a folder of adapter folders (each is version 1); each name's current version is served, a name added there is servable without redeploying.")
    registry_poll_s: float = Field(2.0, ge=0, description="How often an API replica reads each adapter's current version from adapter_root: a publish or rollback is served at most this long after it (0: read at every request).")
    max_adapters_per_replica: int = Field(8, gt=0, description="Adapters kept loaded per replica (least recently used is unloaded).")
    quantization: Literal["as_trained", "none", "4bit", "8bit"] = Field("as_trained", description="Base model precision in replicas; 'as_trained' uses quantization.mode.")
    engine: Literal["auto", "vllm", "hf"] = Field("auto", description="Generation engine: vllm, hf (transformers models in a step loop; both batch continuously with per-row adapters), or auto: vllm on GPU replicas for causal models it supports, else hf.")
    vllm_max_lora_rank: Literal[8, 16, 32, 64, 128, 256, 320, 512] = Field(64, description="vLLM: largest adapter rank it accepts (a higher-rank adapter is a 400 model_not_loadable); memory grows with it.")
    vllm_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="vLLM: precision of the base and adapters (float16 is GPU-only).")
    vllm_kv_cache_gib: float = Field(1.0, gt=0, description="vLLM on CPU replicas: GiB of memory for the KV cache (GPU replicas use vllm_gpu_memory_utilization).")
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM on GPU replicas: share of GPU memory for weights and KV cache.")
    max_batch_size: int = Field(16, gt=0, description="HF engine: rows (requests x n) decoded together in one forward pass; later requests wait for a row (1 turns batching off).")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="HF engine, seq2seq models only (static batches): how long a batch waits to fill; causal models join the running batch at the next step.")
    default_max_tokens: int = Field(128, gt=0, description="max_tokens of a request that sets none.")
    max_tokens_limit: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for (larger is a 400 that says so).")
    max_concurrent_requests: int = Field(64, gt=0, description="Requests in flight per API replica before overload applies.")
    overload: Literal["reject", "queue"] = Field("reject", description="Past max_concurrent_requests: answer 429 at once, or queue until a slot frees.")
    drain_timeout_s: float = Field(30, ge=0, description="On SIGTERM or Ctrl-C (and in Serve's graceful shutdown of a replica): how long requests in flight may take to finish while new ones get 503.")
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

    @property
    def on_gpu(self) -> bool:
        """Model replicas ask Ray for a GPU (serve.replica_resources)."""
        return self.replica_resources.get("GPU", 0) > 0

    def bearer_token(self) -> str | None:
        """The API key in force here: serve.api_key, else the variable named by api_key_env."""
        return self.api_key.get_secret_value() if self.api_key else os.environ.get(self.api_key_env) or None


class PromoteSection(Section):
    registry: str | None = Field(None, description="Adapter registry (a folder, s3:// or gs://) lorafleet pipeline publishes its adapter to, made current only if it passes the gate; empty: the pipeline serves its adapter by name, ungated.")
    name: str | None = Field(None, description="The adapter's name in the registry; default: the output folder's name.")
    metric: str = Field("eval_loss", description="Evaluation metric the gate compares on the held-out set: eval_loss, perplexity, or one of eval.metrics' (exact_match, f1, rouge1, rouge2, rougeL, json_valid, json_schema_valid).")
    mode: Literal["auto", "min", "max"] = Field("auto", description="Whether lower or higher scores are better; auto: min for eval_loss and perplexity, else max.")
    margin: float = Field(0.0, ge=0, description="How much worse than the current version (in the metric's units) the new adapter may score and still be made current.")
    keep: int = Field(10, gt=0, description="Versions the registry keeps per name (the oldest beyond are removed, never the current one).")

    def lower_is_better(self) -> bool:
        return self.mode == "min" or (self.mode == "auto" and self.metric in ("eval_loss", "perplexity"))


class TrackingSection(Section):
    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list, description="Experiment trackers each training run and sweep writes to, any combination (empty: the run report only).")
    run_name: str | None = Field(None, description="The run's name in the trackers; default: the output folder's name (a sweep's trials are named by trial id).")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking server or store; default: MLFLOW_TRACKING_URI, else MLflow's own default. Credentials only via MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN.")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment; default: MLFLOW_EXPERIMENT_NAME, else 'lorafleet'.")
    wandb_project: str | None = Field(None, description="W&B project; default: WANDB_PROJECT, else 'lorafleet'. The API key only via WANDB_API_KEY or `wandb login`.")
    wandb_mode: Literal["online", "offline"] | None = Field(None, description="W&B mode; default: WANDB_MODE, else online (offline writes runs under the output folder for `wandb sync`).")
    log_adapter: bool = Field(True, description="Upload the exported adapter (a sweep: the best one) as an artifact with the report and plots.")


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
    promote: PromoteSection = Field(default_factory=PromoteSection, description="Publishing to an adapter registry (lorafleet pipeline) behind an evaluation gate against the current version.")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="Experiment tracking (MLflow, TensorBoard, W&B) of training runs and sweeps.")

    @property
    def is_sweep(self) -> bool:
        """Written for a sweep: the file (or an override) sets tune:, so it is checked, and piped, as one."""
        return "tune" in self.model_fields_set

    @model_validator(mode="after")
    def _cross_field_rules(self) -> RunConfig:
        found = rules.problems(self)
        if found:
            raise ValueError("\n".join(found))
        return self
