"""Names the schema and its rules share: packaged models, metric names, target sets, optimizers."""

from __future__ import annotations

import re

PACKAGED_MODELS = ("smollm2-135m-instruct",)
# Task metric names each eval.metrics entry reports (as eval_<name> during training).
TASK_METRIC_NAMES = {
    "squad": ("exact_match", "f1"),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "json": ("json_valid", "json_schema_valid"),
}
TARGET_SETS = ("attention", "mlp", "attention+mlp", "all-linear")
# Config key -> the tune: field that searches it without a `space:` entry.
TUNE_SHORTCUTS = {
    "training.learning_rate": "learning_rate",
    "lora.r": "lora_r",
    "lora.target_modules": "target_modules",
}
PAGED_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit")
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "adafactor", "sgd", *PAGED_OPTIMIZERS)
# A served adapter name: one path component, so a name can never reach outside the adapter root.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
