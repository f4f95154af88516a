"""The whole run configuration: one YAML file, one pydantic model (`RunConfig`).

`load_config(path, overrides)` reads the YAML, applies dotted `key=value` overrides, validates
everything and raises `ConfigError` listing every problem at once (field, value, fix) before
anything touches Ray. By concept: `schema` (the sections and their fields), `rules` (cross-field
rules), `loading` (YAML, overrides, error translation, saving), `errors`, and the `names` and
dotted `keys` they share. Import from here.
"""

from jobs.config.errors import ConfigError, problem
from jobs.config.keys import set_dotted
from jobs.config.loading import apply_overrides, as_json, dump_config, load_config, validate, with_absolute_paths
from jobs.config.names import ADAPTER_NAME, PACKAGED_MODELS, TARGET_SETS, TASK_METRIC_NAMES
from jobs.config.rules import read_deepspeed, sweep_problems
from jobs.config.schema import (
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    QuantizationConfig,
    RayConfig,
    RunConfig,
    SearchDimension,
    ServeSection,
    TrainingConfig,
    TuneSection,
)

__all__ = [
    "ADAPTER_NAME",
    "PACKAGED_MODELS",
    "TARGET_SETS",
    "TASK_METRIC_NAMES",
    "ConfigError",
    "problem",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "QuantizationConfig",
    "RayConfig",
    "RunConfig",
    "SearchDimension",
    "ServeSection",
    "TrainingConfig",
    "TuneSection",
    "apply_overrides",
    "as_json",
    "dump_config",
    "load_config",
    "read_deepspeed",
    "set_dotted",
    "sweep_problems",
    "validate",
    "with_absolute_paths",
]
