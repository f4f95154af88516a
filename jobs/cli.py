"""`lorafleet` command line: every command is `--config file.yaml` plus dotted overrides."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from jobs.config import ConfigError, load_config
from jobs.data import DataError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune with QLoRA on Ray: train, sweep, serve.")
console = Console(stderr=True)

ConfigOption = Annotated[Optional[str], typer.Option("--config", "-c", help="Run config YAML (see configs/).")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. training.learning_rate=1e-4 lora.r=16", show_default=False)]


@app.callback()
def _group() -> None:
    """Keeps `train` a subcommand while it is the only one."""


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Tokenizers' thread pool deadlocks in processes forked by Ray and the DataLoader.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
def train(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Train a LoRA/QLoRA adapter with Ray Train; writes adapter, metrics.json and report.md."""
    from ray.train import TrainingFailedError

    from jobs.train import train as run_training

    _setup_logging()
    try:
        run = load_config(config, overrides or [])
        outcome = run_training(run)
    except (ConfigError, DataError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except TrainingFailedError as exc:
        console.print(f"[bold red]training failed:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    m = outcome.metrics
    losses = [f"{label} {m[f'first_{key}']:.4f} -> {m[f'final_{key}']:.4f}" for key, label in (("train_loss", "train loss"), ("eval_loss", "eval loss")) if m[f"first_{key}"] is not None]
    console.print(f"[bold green]done[/] in {m['job_total_s']} s, {m['steps']} steps: {', '.join(losses) or 'no loss logged'}", highlight=False)
    console.print(f"adapter: {outcome.adapter_dir}\nreport:  {outcome.output_dir / 'report.md'}\nmetrics: {outcome.output_dir / 'metrics.json'}", highlight=False)


def run_stage(stage: str) -> None:
    """`python -m jobs.<stage> ...` (the `ray job submit` entrypoint) runs the same command."""
    app([stage, *sys.argv[1:]])


def main() -> None:
    app()
