"""Trainer callbacks of the training job: run info, task metrics at each evaluation, a final evaluation, and the
fault-injection hook the tests use."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
import ray.train
import torch
from transformers import TrainerCallback

from jobs.config import RunConfig
from jobs.evaluation import task_metrics
from jobs.prompting import Prompting

log = logging.getLogger("lorafleet.train")
FAIL_AT_ENV = "LORAFLEET_FAIL_AT"


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
