"""How the Hugging Face Trainer runs: TrainingArguments from `training.*`, DeepSpeed, and the batch collator."""

from __future__ import annotations

from typing import Any

from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from jobs import devices
from jobs.config import ConfigError, RunConfig, problem, read_deepspeed
from jobs.prompting import Prompting
from jobs.train.packing import PackedRowsCollator

# DeepSpeed keys the Trainer fills from `training.*` when they say "auto".
TRAINER_OWNED_DEEPSPEED_KEYS = (
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


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
    precision = devices.training_precision(t.precision, run.ray.use_gpu)  # in the worker: its GPU decides
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


def hf_trainer(
    run: RunConfig,
    model,
    prompting: Prompting,
    output_dir: str,
    train_set,
    eval_set=None,
    max_steps: int | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> Trainer:
    """The Trainer of every Train worker (bench/gpu_check.py runs this same one on a GPU, outside Ray)."""
    return Trainer(
        model=model,
        args=training_arguments(run, output_dir, eval_set is not None, max_steps),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator(run, prompting),
        processing_class=prompting.tokenizer,
        callbacks=callbacks,
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
