"""The training job: QLoRA with the Hugging Face Trainer inside Ray Train.

    python -m jobs.train --config configs/demo.yaml [dotted.key=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config configs/demo.yaml

The driver validates the config and the data (before any Ray resource is requested),
tokenizes once, runs a `TorchTrainer` whose workers each hold one model replica (DDP),
then exports the adapter, metrics and run report to `training.output_dir`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.train
import ray.train.torch
import torch
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from transformers import (
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from jobs import adapter, cluster, ray_data, report, storage, tracking
from jobs.config import ConfigError, RunConfig, dump_config, problem, read_deepspeed
from jobs.data import PreparedData, prepare
from jobs.evaluation import task_metrics
from jobs.model import load_for_training, load_tokenizer, parameter_counts
from jobs.prompting import Prompting
from jobs.train.packing import PackedRowsCollator

log = logging.getLogger("lorafleet.train")
FAIL_AT_ENV = "LORAFLEET_FAIL_AT"
# DeepSpeed keys the Trainer fills from `training.*` when they say "auto".
TRAINER_OWNED_DEEPSPEED_KEYS = (
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


@dataclass
class TrainOutcome:
    output_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    published: str | None = None  # the copy on ray.storage_path when that is s3:// or gs://

    @property
    def summary_md(self) -> str:
        """What the run did and where its outputs are, for the CLI to print."""
        m = self.metrics
        pairs = (("train_loss", "train loss"), ("eval_loss", "eval loss"))
        losses = [
            f"{label} {m[f'first_{key}']:.4f} -> {m[f'final_{key}']:.4f}"
            for key, label in pairs
            if m[f"first_{key}"] is not None
        ]
        lines = [
            f"done in {m['job_total_s']} s, {m['steps']} steps: {', '.join(losses) or 'no loss logged'}",
            f"adapter: {self.adapter_dir}",
            f"report:  {self.output_dir / 'report.md'}",
            f"metrics: {self.output_dir / 'metrics.json'}",
        ]
        return "\n".join(lines + ([f"copied to {self.published}"] if self.published else []))


class RunInfoCallback(TrainerCallback):
    """Records parameter counts, the Ray node of each rank, and every resume after a failure, in the
    trainer state's log history."""

    def __init__(self, counts: dict[str, int], resumed: bool, nodes: list[str]):
        self.counts, self.resumed, self.nodes = counts, resumed, nodes

    def on_train_begin(self, args, state, control, **kwargs):
        if not any("trainable_parameters" in entry for entry in state.log_history):
            state.log_history.append(
                {
                    "step": 0,
                    "trainable_parameters": self.counts["trainable"],
                    "total_parameters": self.counts["total"],
                    "worker_nodes": self.nodes,
                }
            )
        if self.resumed:
            state.log_history.append(
                {"step": state.global_step, "resumed_from_step": state.global_step, "worker_nodes": self.nodes}
            )


def worker_nodes() -> list[str]:
    """Every rank's Ray node id, in rank order: where this attempt's workers run."""
    node = ray.get_runtime_context().get_node_id()
    if not torch.distributed.is_initialized():
        return [node]
    gathered: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, node)
    return gathered


class TaskMetricsCallback(TrainerCallback):
    """At each evaluation, rank 0 generates for a sample of the validation set and adds the task
    metrics (eval_f1, eval_rougeL, ...) to that evaluation's log, so Ray and a sweep see them. The
    Trainer logs an evaluation before `on_evaluate`, so the trackers' callbacks get them from here."""

    def __init__(self, run: RunConfig, examples: list[dict[str, Any]], prompting: Prompting, trackers: list):
        self.run, self.examples, self.prompting, self.trackers = run, examples, prompting, trackers

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not self.examples or ray.train.get_context().get_world_rank() != 0:
            return
        _, _, scores = task_metrics(self.run, model, self.prompting, self.examples, desc="Task metrics")
        extra = {f"eval_{name}": value for name, value in scores.items()}
        state.log_history[-1].update(extra)  # the evaluation entry the Trainer just logged
        metrics.update(extra)
        for tracker in self.trackers:
            tracker.on_log(args, state, control, logs=extra)


class FinalEvaluationCallback(TrainerCallback):
    """Evaluates at the last step too when it falls between eval_steps, so the final checkpoint
    (always saved) is reported with metrics of its own, not those of an earlier evaluation."""

    def on_step_end(self, args, state, control, **kwargs):
        if (
            args.eval_strategy == "steps"
            and state.global_step >= state.max_steps
            and state.global_step % args.eval_steps
        ):
            control.should_evaluate = True


class FaultInjectionCallback(TrainerCallback):
    """Test hook, off by default: `LORAFLEET_FAIL_AT=RANK:STEP` kills that rank at that step.

    It fires only in an attempt that did not resume from a checkpoint, so with `ray.max_failures`
    the restarted run goes on (STEP must come after the first checkpoint). It first waits until
    Ray has registered every reported checkpoint: Ray collects reports on a 2 s poll, and a crash
    inside that window loses the newest one. The hook models a crash between checkpoints.
    """

    def __init__(self, resumed: bool):
        rank, _, step = os.environ.get(FAIL_AT_ENV, "").partition(":")
        self.target = None if resumed or not step else (int(rank), int(step))

    def on_step_end(self, args, state, control, **kwargs):
        if self.target == (ray.train.get_context().get_world_rank(), state.global_step):
            ray.train.get_all_reported_checkpoints()
            log.error("%s: killing rank %d at step %d", FAIL_AT_ENV, *self.target)
            os._exit(1)


def deepspeed_config(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """`training.deepspeed` as a dict, with the keys the Trainer owns set to "auto" where absent:
    DeepSpeed refuses a config without a batch size, and "auto" keeps `training.*` the one source."""
    ds = read_deepspeed(value)
    return None if ds is None else {**dict.fromkeys(TRAINER_OWNED_DEEPSPEED_KEYS, "auto"), **ds}


def training_arguments(
    run: RunConfig, output_dir: str, has_eval: bool, max_steps: int | None = None
) -> TrainingArguments:
    """`max_steps`: the steps a streamed dataset (no length) gives, when training.max_steps leaves it to epochs."""
    t = run.training
    precision = t.precision if t.precision != "auto" else ("bf16" if run.ray.use_gpu else "fp32")
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=t.num_epochs,
        max_steps=max_steps or t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a share of the steps
        weight_decay=t.weight_decay,
        optim=t.optimizer,
        max_grad_norm=t.max_grad_norm,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        # Checkpoint at every evaluation, so each Ray report carries fresh eval metrics.
        save_strategy="steps",
        save_steps=t.eval_steps,
        save_total_limit=1,
        logging_steps=t.logging_steps,
        seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not run.ray.use_gpu,
        deepspeed=deepspeed_config(t.deepspeed),
        dataloader_num_workers=t.dataloader_workers,
        # LoRA leaves most of the graph frozen; scanning for unused parameters only costs time.
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        report_to="none",
    )


def collator(run: RunConfig, prompting: Prompting):
    """Padded batches, or (training.packing: padding_free) the examples end to end in a few rows
    (`jobs.train.packing`): position ids restart at every example, so attention and the loss stay inside it
    (sdpa/eager with the KV cache off, as in training: tests/test_packing.py checks the padded batch's loss)."""
    if run.training.packing == "padding_free":
        return PackedRowsCollator(prompting.tokenizer.pad_token_id)
    return DataCollatorForSeq2Seq(prompting.tokenizer, label_pad_token_id=-100)


def check_packing(run: RunConfig, kind: str) -> None:
    """Before Ray starts: padding-free batches need a decoder-only model implemented by transformers itself."""
    if run.training.packing != "padding_free":
        return
    if kind == "seq2seq":
        why = f"{run.model.name} is an encoder-decoder model; packing concatenates decoder-only examples"
    elif run.model.trust_remote_code:
        why = "the model's own remote code may not separate packed examples by position ids"
    else:
        return
    raise ConfigError(
        [
            problem(
                "training.packing",
                "padding_free",
                f"{why}; use training.packing: none (training.group_by_length: true also cuts padding)",
            )
        ]
    )


def _local_resume_dir(workdir: Path) -> str | None:
    """Copy Ray's latest checkpoint (after a worker failure) to local disk for the HF Trainer."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        target = workdir / "resume"
        shutil.copytree(Path(path) / adapter.IN_CHECKPOINT, target)
    log.info("resuming from checkpoint %s", checkpoint.path)
    return str(target)


def streamed_steps(run: RunConfig, train_rows: int) -> int | None:
    """Optimizer steps over a streamed training set: each worker gets an equal share of the rows, in batches."""
    if run.training.max_steps > 0:
        return None
    per_worker = train_rows // run.ray.num_workers
    if per_worker == 0:
        raise ConfigError(
            [
                problem(
                    "ray.num_workers",
                    run.ray.num_workers,
                    f"more workers than the {train_rows} training rows; use fewer",
                )
            ]
        )
    batches = math.ceil(per_worker / run.training.batch_size)
    return math.ceil(math.ceil(batches / run.training.gradient_accumulation_steps) * run.training.num_epochs)


def streamed_batches(name: str, run: RunConfig, prompting: Prompting, shuffle: bool):
    """This worker's shard of a Ray Data set as collated batches (`prepare_trainer` hands them to the Trainer).
    Shuffled within a local buffer, seeded: Ray Data streams, the HF sampler cannot see the whole set."""
    collate = collator(run, prompting)

    def collate_rows(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        size = len(batch["input_ids"])
        return collate([{key: values[i].tolist() for key, values in batch.items()} for i in range(size)])

    return ray.train.get_dataset_shard(name).iter_torch_batches(
        batch_size=run.training.batch_size,
        collate_fn=collate_rows,
        local_shuffle_buffer_size=20 * run.training.batch_size if shuffle else None,
        local_shuffle_seed=run.training.seed if shuffle else None,
    )


def _worker_data(config: dict[str, Any], run: RunConfig, prompting: Prompting):
    """Training set, evaluation set and task-metric examples: shipped whole (data.loader: driver) or streamed."""
    if config["data"] is not None:
        data: PreparedData = ray.get(config["data"])
        return data.train, data.eval, data.eval_examples
    evaluation = streamed_batches("eval", run, prompting, shuffle=False) if config["has_eval"] else None
    return streamed_batches("train", run, prompting, shuffle=True), evaluation, config["eval_examples"]


WORKDIR_PREFIX = "lorafleet-worker-"


def worker_workdir() -> Path:
    """A fresh folder for this worker's Trainer (its checkpoints), named with the host and the worker's process id.
    A worker that was killed ran no `finally` and left its folder: this host's folders of processes no longer alive
    are removed first, so that a node that sees workers fail does not fill its disk with their checkpoints (the host
    in the name: a temp folder shared by containers holds other process-id spaces' folders too)."""
    mine = f"{WORKDIR_PREFIX}{socket.gethostname()}-"
    for stale in Path(tempfile.gettempdir()).glob(f"{mine}*-*"):
        # `<pid>-<mkdtemp's suffix>`, which has no dash: a host named `<this host>-5` has more dashes, and is skipped.
        pid, _, suffix = stale.name.removeprefix(mine).partition("-")
        if pid.isdigit() and "-" not in suffix and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{mine}{os.getpid()}-"))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: one model replica, DDP across workers."""
    run = RunConfig.model_validate(config["run"])
    device = ray.train.torch.get_device()
    prompting = Prompting(load_tokenizer(run.model), config["kind"], config["use_chat"])
    train_set, eval_set, eval_examples = _worker_data(config, run, prompting)
    model = load_for_training(run, device, prompting.kind)
    workdir = worker_workdir()
    resume_dir = _local_resume_dir(workdir)
    resumed = resume_dir is not None
    # One tracked run per job: only rank 0 writes to it.
    trackers = tracking.worker_callbacks(config["tracking"]) if ray.train.get_context().get_world_rank() == 0 else []
    trainer = Trainer(
        model=model,
        args=training_arguments(run, str(workdir / "hf"), eval_set is not None, config["max_steps"]),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator(run, prompting),
        processing_class=prompting.tokenizer,
        callbacks=[
            RunInfoCallback(parameter_counts(model), resumed=resumed, nodes=worker_nodes()),
            TaskMetricsCallback(run, eval_examples[: run.eval.during_training_samples], prompting, trackers),
            FinalEvaluationCallback(),
            FaultInjectionCallback(resumed=resumed),
            RayTrainReportCallback(),
            *trackers,
        ],
    )
    trainer = prepare_trainer(trainer)
    try:
        trainer.train(resume_from_checkpoint=resume_dir)
    finally:
        if trackers:
            tracking.worker_done(config["tracking"])
        shutil.rmtree(workdir, ignore_errors=True)


def fit(
    run: RunConfig,
    data: PreparedData | ray_data.StreamedData,
    prompting: Prompting,
    placement: cluster.RunPlacement | None = None,
    tracked: tracking.Tracking | None = None,
) -> ray.train.Result:
    cluster.connect(run.ray.address)
    run_json = run.model_dump(mode="json")
    # Inlined here: a DeepSpeed file path of the driver's node need not exist on the workers' nodes.
    run_json["training"]["deepspeed"] = deepspeed_config(run.training.deepspeed)
    streamed = isinstance(data, ray_data.StreamedData)
    datasets = {"train": data.train, **({"eval": data.eval} if data.eval is not None else {})} if streamed else {}
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        # Each worker loads its own tokenizer; the rest of how prompts are read travels with the config.
        train_loop_config={
            "run": run_json,
            "data": None if streamed else ray.put(data),
            "has_eval": data.eval is not None,
            "eval_examples": data.eval_examples[: run.eval.during_training_samples] if streamed else None,
            "max_steps": streamed_steps(run, data.train_rows) if streamed else None,
            "kind": prompting.kind,
            "use_chat": prompting.use_chat,
            "tracking": tracked,
        },
        datasets=datasets,
        # Every worker evaluates the whole held-out set, so eval_loss is the same figure on every rank.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.ray.num_workers,
            use_gpu=run.ray.use_gpu,
            resources_per_worker=run.ray.resources_per_worker,
            placement_strategy=run.ray.placement_strategy,
        ),
        run_config=cluster.train_run_config(
            run, data.eval is not None, placement or cluster.RunPlacement(), passed=(FAIL_AT_ENV,)
        ),
    )
    return trainer.fit()


def _chosen_checkpoint(result: ray.train.Result, has_eval: bool) -> ray.train.Checkpoint:
    if has_eval and result.best_checkpoints:
        return result.get_best_checkpoint(metric="eval_loss", mode="min")
    return result.checkpoint


def export(result: ray.train.Result, run: RunConfig, output_dir: Path, has_eval: bool) -> tuple[Path, dict[str, Any]]:
    """Adapter + tokenizer from the chosen checkpoint, and the full log history of the run."""
    chosen = _chosen_checkpoint(result, has_eval)
    adapter_dir = output_dir / "adapter"
    with chosen.as_directory() as path:
        adapter.install_from_checkpoint(Path(path), adapter_dir)
        chosen_state = json.loads((Path(path) / adapter.IN_CHECKPOINT / "trainer_state.json").read_text())
    with result.checkpoint.as_directory() as path:
        final_state = json.loads((Path(path) / adapter.IN_CHECKPOINT / "trainer_state.json").read_text())
    info = {
        "chosen_step": chosen_state["global_step"],
        "final_step": final_state["global_step"],
        "checkpoint": chosen.path,
        "log_history": final_state["log_history"],
    }
    return adapter_dir, info


def report_files(output_dir: Path) -> list[Path]:
    """What a run's trackers get besides the adapter: the report, its plots, the metrics and the config."""
    named = [output_dir / name for name in ("report.md", "metrics.json", "config.yaml")]
    return named + sorted(output_dir.glob("*.png"))


def load_data(run: RunConfig, prompting: Prompting) -> PreparedData | ray_data.StreamedData:
    """data.loader: driver reads and tokenizes here (before Ray starts); ray_data on the cluster."""
    if run.data.loader == "ray_data":
        return ray_data.prepare(run, prompting)
    return prepare(run.data, prompting)


def train(run: RunConfig) -> TrainOutcome:
    """Setup, train, save, clean up: the whole job, top to bottom."""
    started = time.time()
    output_dir = Path(run.training.output_dir).resolve()
    prompting = Prompting.load(run.model)
    check_packing(run, prompting.kind)
    data = load_data(run, prompting)
    with tempfile.TemporaryDirectory(prefix="lorafleet-check-") as scratch:
        training_arguments(run, scratch, data.eval is not None)  # HF's own checks, before Ray starts
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_config(run))
    tracked = tracking.start(run, output_dir)  # an unreachable tracker fails here, before Ray starts

    fit_started = time.time()
    try:
        result = fit(run, data, prompting, tracked=tracked)  # raises TrainingFailedError once max_failures is spent
    except BaseException:
        tracking.finish(tracked, [output_dir / "config.yaml"], failed=True)
        raise
    fit_seconds = time.time() - fit_started

    adapter_dir, info = export(result, run, output_dir, data.eval is not None)
    metrics = report.summarize(info["log_history"], fit_seconds, time.time() - started)
    metrics.update(
        chosen_step=info["chosen_step"],
        final_step=info["final_step"],
        checkpoint=info["checkpoint"],
        kind=prompting.kind,
    )
    (output_dir / "metrics.json").write_text(
        json.dumps({**metrics, "data": data.report, "log_history": info["log_history"]}, indent=2)
    )
    report.write(output_dir, run, metrics, data.report, info["log_history"])
    tracking.finish(tracked, report_files(output_dir), adapter_dir if run.tracking.log_adapter else None, metrics)
    published = storage.publish(output_dir, run.ray.storage_path)
    return TrainOutcome(output_dir=output_dir, adapter_dir=adapter_dir, metrics=metrics, published=published)
