"""The training job: QLoRA with the Hugging Face Trainer inside Ray Train.

    python -m jobs.train --config configs/demo.yaml [dotted.key=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config configs/demo.yaml

The driver validates the config and the data (before any Ray resource is requested), prepares the data once
(`jobs.data`), runs a `TorchTrainer` whose workers each hold one model replica (DDP), then exports the adapter,
metrics and run report to `training.output_dir`. Modules: `job` (the driver: fit, export, train), `worker` (each
Train worker), `arguments` (TrainingArguments, DeepSpeed, collator), `callbacks`, `packing`.
"""

from jobs.train.arguments import check_packing, collator, deepspeed_config, hf_trainer, training_arguments
from jobs.train.callbacks import FinalEvaluationCallback
from jobs.train.job import TrainOutcome, fit, train
from jobs.train.worker import WORKDIR_PREFIX, streamed_batches, worker_workdir

__all__ = [
    "WORKDIR_PREFIX",
    "FinalEvaluationCallback",
    "TrainOutcome",
    "check_packing",
    "collator",
    "deepspeed_config",
    "fit",
    "hf_trainer",
    "streamed_batches",
    "train",
    "training_arguments",
    "worker_workdir",
]
