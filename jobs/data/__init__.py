"""Training data, for every stage: `prepare` for training and sweeps, `held_out_examples` for evaluation.

Two loaders read, check, split and tokenize the rows: the driver loader (`data.loader: driver`, `jobs.data.driver`)
in this process, for data that fits it, and the Ray Data loader (`data.loader: ray_data`, `jobs.data.ray_data`) on
the cluster, for data that does not. Both return a `Prepared`, give a row the same tokens, and fill the same report;
no stage asks which one it got. Modules: `formats` (file format and row layout), `readers` (bytes to rows),
`examples` (rows to examples), `encoding` (examples to tokens), `statistics` (the report's figures), `errors` (every
data message).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from jobs.config import RunConfig
from jobs.data.driver import load_examples, split
from jobs.data.driver import prepare as prepare_on_driver
from jobs.data.encoding import encode
from jobs.data.errors import DataError
from jobs.data.examples import generation_prompt

if TYPE_CHECKING:
    import ray.data

    from jobs.prompting import Prompting

__all__ = ["DataError", "Prepared", "encode", "generation_prompt", "held_out_examples", "load_examples", "prepare"]


class Prepared(Protocol):
    """What a loader hands the training job and a sweep: the sets the Train workers read, and the report."""

    eval_examples: list[dict[str, Any]]  # held-out examples (prompt and references) for task metrics in training
    report: dict[str, Any]  # the run report's data section

    @property
    def train_rows(self) -> int:
        """Training rows, which set the steps of an epoch."""

    @property
    def has_eval(self) -> bool:
        """Whether there is a held-out set for the evaluation loss."""

    def ray_datasets(self) -> dict[str, ray.data.Dataset]:
        """The sets each Train worker streams its shard of, by name ("train", "eval"); empty when they travel whole."""

    def whole_sets(self) -> tuple[Any, Any] | None:
        """The training and evaluation sets (the latter may be None) shipped whole to every worker; None when
        streamed."""

    def serves(self, run: RunConfig) -> bool:
        """Whether a sweep trial with this config trains on these rows rather than preparing its own."""


def prepare(run: RunConfig, prompting: Prompting) -> Prepared:
    """Read, check, split and tokenize with data.loader; a DataError (file, row, field) before any Train worker."""
    if run.data.loader == "ray_data":
        from jobs.data.ray_data.prepare import prepare as prepare_on_ray  # Ray Data only where it is chosen

        return prepare_on_ray(run, prompting)
    return prepare_on_driver(run.data, prompting)


def held_out_examples(run: RunConfig) -> list[dict[str, Any]]:
    """What the evaluation stage scores: `data.eval_path` in full, else the held-out rows of the training's split."""
    if run.data.eval_path:
        examples, _ = load_examples(run.data.model_copy(update={"path": run.data.eval_path, "max_samples": None}))
        return examples
    if run.data.validation_fraction == 0:
        raise DataError(
            "data.validation_fraction = 0: there is no held-out split to evaluate on; set data.eval_path or "
            "data.validation_fraction"
        )
    if run.data.loader == "ray_data":
        from jobs.data.ray_data.prepare import validation_examples

        return validation_examples(run)
    examples, _ = load_examples(run.data)
    return list(split(examples, run.data)[1])
