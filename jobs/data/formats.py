"""How data is read: the file's format (from data.format or the suffix) and the rows' layout (from the columns)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jobs.config import DataConfig
from jobs.data.errors import DataError

if TYPE_CHECKING:
    from jobs.prompting import Prompting

SQUAD_PROMPT = "Answer with a short span copied from the context.\nContext: {context}\nQuestion: {question}"
FORMAT_DEFAULTS = {"squad": (SQUAD_PROMPT, "answer")}
GENERIC_DEFAULTS = ("{input}", "output")
# The one suffix table: a format's files. `.json` is SQuAD unless data.format names a row layout (then a JSON array).
SUFFIXES = {
    "jsonl": (".jsonl", ".ndjson"),
    "csv": (".csv",),
    "parquet": (".parquet",),
    "squad": (".json",),
    "json": (".json",),
}
FORMAT_OF_SUFFIX = {suffix: fmt for fmt, suffixes in SUFFIXES.items() if fmt != "json" for suffix in suffixes}
FILE_FORMATS = ("jsonl", "csv", "parquet", "squad", "hf")  # data.format values that name the file's format
ROW_LAYOUTS = ("messages", "sharegpt", "alpaca")  # data.format values that name the rows' shape, not the file's
DEMOS = ("demo", "demo-chat")  # generated tasks: data.path names them


def resolve_format(cfg: DataConfig) -> str:
    """The file's format (how to read it); data.format: messages / sharegpt / alpaca leave it to the extension."""
    if cfg.format not in ("auto", *ROW_LAYOUTS):
        return cfg.format
    if cfg.path in DEMOS:
        return cfg.path
    path = Path(cfg.path)
    if path.is_dir() or not path.suffix:
        return "hf"
    suffix = path.suffix.lower()
    if cfg.format in ROW_LAYOUTS and suffix == ".json":
        return "json"  # a JSON array of rows (SQuAD files are read only with data.format: auto or squad)
    if suffix not in FORMAT_OF_SUFFIX:
        raise DataError(
            f"data.format = {cfg.format!r}: cannot tell the format of {cfg.path!r}; set data.format to one of jsonl, "
            "csv, parquet, squad, hf"
        )
    return FORMAT_OF_SUFFIX[suffix]


def resolve_layout(cfg: DataConfig, fmt: str, columns: set[str]) -> str:
    """The rows' shape: 'prompt' (template + target column), 'alpaca', or a conversation ('messages', 'sharegpt')."""
    if cfg.format in ROW_LAYOUTS:
        return cfg.format
    if fmt == "demo-chat":
        return "messages"
    if fmt in ("demo", "squad") or cfg.prompt_template or cfg.target_column:
        return "prompt"
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    return "prompt"


def is_conversation(layout: str) -> bool:
    return layout in ("messages", "sharegpt")


def check_chat(layout: str, prompting: Prompting) -> None:
    """Conversations need the tokenizer's chat template."""
    if is_conversation(layout) and not prompting.use_chat:
        raise DataError(
            f"data.format: {layout} conversations are rendered with the tokenizer's chat template, and this "
            "model has none (or model.chat_template is false); use a chat model, or single-turn rows with "
            "data.prompt_template / data.format: alpaca"
        )


def described(fmt: str, layout: str) -> str:
    """The format as the run report names it."""
    return fmt if layout == "prompt" else f"{fmt} ({layout})"


def templates(cfg: DataConfig, fmt: str) -> tuple[str, str]:
    default_prompt, default_target = FORMAT_DEFAULTS.get(fmt, GENERIC_DEFAULTS)
    return cfg.prompt_template or default_prompt, cfg.target_column or default_target
