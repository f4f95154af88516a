"""What runs in every Ray Train worker: one model replica and its Trainer (DDP across workers), on the rows shipped
whole or on this worker's streamed shard, resuming from Ray's latest checkpoint after a failure."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.train
import ray.train.torch
import torch
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

from jobs import adapter, tracking
from jobs.config import RunConfig
from jobs.model import load_for_training, load_tokenizer, parameter_counts
from jobs.prompting import Prompting
from jobs.train.arguments import collator, hf_trainer
from jobs.train.callbacks import (
    FaultInjectionCallback,
    FinalEvaluationCallback,
    RunInfoCallback,
    TaskMetricsCallback,
    worker_nodes,
)

log = logging.getLogger("lorafleet.train")


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
    """Training and evaluation sets: shipped whole through the object store, or this worker's streamed shard."""
    if config["whole"] is not None:
        return ray.get(config["whole"])
    evaluation = streamed_batches("eval", run, prompting, shuffle=False) if config["has_eval"] else None
    return streamed_batches("train", run, prompting, shuffle=True), evaluation


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
    train_set, eval_set = _worker_data(config, run, prompting)
    model = load_for_training(run, device, prompting.kind)
    workdir = worker_workdir()
    resume_dir = _local_resume_dir(workdir)
    resumed = resume_dir is not None
    # One tracked run per job: only rank 0 writes to it.
    trackers = tracking.worker_callbacks(config["tracking"]) if ray.train.get_context().get_world_rank() == 0 else []
    trainer = hf_trainer(
        run,
        model,
        prompting,
        str(workdir / "hf"),
        train_set,
        eval_set,
        config["max_steps"],
        callbacks=[
            RunInfoCallback(parameter_counts(model), resumed=resumed, nodes=worker_nodes()),
            TaskMetricsCallback(run, config["eval_examples"], prompting, trackers),
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
