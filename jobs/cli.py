"""`lorafleet` command line: every command is `--config file.yaml` plus dotted overrides."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from jobs.config import ConfigError, load_config
from jobs.data import DataError
from jobs.registry_cli import app as registry_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune with QLoRA on Ray: train, sweep, serve.")
# Never re-wrapped at the terminal's width: a command, path or fix printed for a user to copy comes out whole.
console = Console(stderr=True, soft_wrap=True)  # errors and status
results = Console(soft_wrap=True)  # what a command produces (tables, output paths)

ConfigOption = Annotated[Optional[str], typer.Option("--config", "-c", help="Run config YAML (see configs/).")]
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="Dotted overrides, e.g. training.learning_rate=1e-4 lora.r=16", show_default=False),
]


def _print(text: str) -> None:
    """A stage's summary as it wrote it: no rich markup or highlighting applied to paths and tables."""
    results.print(text, highlight=False, markup=False)


def _print_where(**places) -> None:
    """`label: place` lines, aligned, for the places that exist (a None is left out)."""
    shown = {label.replace("_", " "): place for label, place in places.items() if place}
    width = max(map(len, shown)) + 1
    _print("\n".join(f"{label + ':':<{width}} {place}" for label, place in shown.items()))


@contextmanager
def _exit_on(errors: tuple[type[BaseException], ...], code: int = 2, label: str = "error") -> Iterator[None]:
    """A known failure ends the command with one readable line and an exit code, not a traceback."""
    try:
        yield
    except errors as exc:
        console.print(f"[bold red]{label}:[/] {exc}", highlight=False)
        raise typer.Exit(code) from None


@app.callback()
def _setup_logging() -> None:
    """Every command logs at INFO, with the logger's name (lorafleet.*, ray.*) on each line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Tokenizers' thread pool deadlocks in processes forked by Ray and the DataLoader.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
def train(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Train a LoRA/QLoRA adapter with Ray Train; writes adapter, metrics.json and report.md."""
    from ray.train import TrainingFailedError

    from jobs.train import train as run_training

    with _exit_on((TrainingFailedError,), 1, "training failed"), _exit_on((ConfigError, DataError)):
        outcome = run_training(load_config(config, overrides or []))
    _print(outcome.summary_md)


ResumeOption = Annotated[
    Optional[Path], typer.Option(help="Continue the interrupted sweep in this folder (its tune.output_dir).")
]


@app.command()
def sweep(config: ConfigOption = None, overrides: Overrides = None, resume: ResumeOption = None) -> None:
    """Sweep hyperparameters with Ray Tune (each trial a Ray Train run); writes leaderboard and best/adapter."""
    from tune.sweep import resume_config
    from tune.sweep import sweep as run_sweep

    with _exit_on((ConfigError, DataError)):
        if resume and (config or overrides):
            raise ConfigError(
                [
                    f"--resume = {str(resume)!r}: a sweep resumes with the config it started with "
                    f"({resume}/sweep.yaml); drop --config and overrides"
                ]
            )
        run = resume_config(resume) if resume else load_config(config, overrides or [])
        outcome = run_sweep(run, resume=resume is not None)
    _print(outcome.summary_md)
    if outcome.summary["best"] is None:
        console.print("[bold red]no trial reported the metric[/]; see the failed trials above", highlight=False)
        raise typer.Exit(1)
    where = outcome.sweep_dir
    tensorboard = f"tensorboard --logdir {where}"
    _print_where(
        best_adapter=where / "best" / "adapter",
        leaderboard=where / "leaderboard.md",
        tensorboard=tensorboard,
        copied_to=outcome.published,
    )


# The eval command's options, one line each.
AdapterOption = Annotated[Optional[Path], typer.Option(help="Adapter folder; default: <training.output_dir>/adapter.")]
BaselineOption = Annotated[bool, typer.Option("--baseline", help="Evaluate the base model alone.")]
SkipBaseOption = Annotated[
    bool, typer.Option("--skip-base", help="Evaluate the adapter alone, without the base model.")
]
PredictionsOption = Annotated[Optional[Path], typer.Option(help="Write one JSON line per example with its metrics.")]
OutputOption = Annotated[Optional[Path], typer.Option(help="Report folder; default: <training.output_dir>/eval.")]


@app.command("eval")
def evaluate(
    config: ConfigOption = None,
    overrides: Overrides = None,
    adapter: AdapterOption = None,
    baseline: BaselineOption = False,
    skip_base: SkipBaseOption = False,
    predictions: PredictionsOption = None,
    output: OutputOption = None,
) -> None:
    """Evaluate the adapter against the base model on the same examples: eval.md, eval.json, eval.png."""
    from jobs.evaluation import run_eval

    with _exit_on((ConfigError, DataError, FileNotFoundError)):
        run = load_config(config, overrides or [])
        if baseline and (adapter or skip_base):
            raise ConfigError(
                [
                    f"--baseline: evaluates the base model alone; drop --adapter/--skip-base (got adapter={adapter}, "
                    f"skip_base={skip_base})"
                ]
            )
        if not baseline:
            adapter = adapter or Path(run.training.output_dir) / "adapter"
            if not adapter.is_dir():
                raise ConfigError(
                    [
                        f"--adapter = {str(adapter)!r}: no such folder; train first, pass --adapter DIR, or use "
                        "--baseline"
                    ]
                )
        output_dir = output or Path(run.training.output_dir) / "eval"
        outcome = run_eval(run, None if baseline else adapter, not skip_base, output_dir, predictions)
    _print(outcome.summary_md)
    _print(f"report: {outcome.report}" + (f"\npredictions: {predictions}" if predictions else ""))


ExportAdapterOption = Annotated[Path, typer.Option("--adapter", help="The adapter folder to merge or check.")]
MergedOption = Annotated[Optional[Path], typer.Option("--merged", help="Write the merged model to this new folder.")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="Weights of the merged model: fp32, bf16 or fp16.")]
CheckOption = Annotated[
    Optional[str], typer.Option("--check", help="Refuse the adapter if this engine cannot load it: vllm.")
]


@app.command()
def export(
    adapter: ExportAdapterOption,
    config: ConfigOption = None,
    overrides: Overrides = None,
    merged: MergedOption = None,
    dtype: DtypeOption = "fp32",
    check: CheckOption = None,
) -> None:
    """Merge an adapter into its unquantized base (a plain checkpoint), and/or check a serving engine can load it.

    The base comes from --config, else from the config.yaml the training run wrote next to the adapter."""
    from jobs import export as exporting

    with _exit_on((ConfigError, FileNotFoundError, OSError)):
        problems = (
            [f"--dtype = {dtype!r}: use one of {', '.join(exporting.DTYPES)}"] if dtype not in exporting.DTYPES else []
        )
        if check is not None and check not in exporting.ENGINES:
            problems.append(f"--check = {check!r}: use one of {', '.join(exporting.ENGINES)}")
        if merged is None and check is None:
            problems.append("nothing to do: pass --merged OUT (a merged model) and/or --check vllm")
        if problems:
            raise ConfigError(problems)
        trained_with = adapter.parent / "config.yaml"
        run = load_config(config or (str(trained_with) if trained_with.is_file() else None), overrides or [])
        if check:
            refused = exporting.check(adapter, check, run)
            if refused:
                console.print(f"[bold red]{check} cannot load {adapter}:[/] " + "; ".join(refused), highlight=False)
                raise typer.Exit(1)
            _print(f"{check} can load {adapter}")
        if merged:
            _print(f"merged model: {exporting.merge(run, adapter, merged, dtype)}")


BuildOption = Annotated[
    bool, typer.Option("--build", help="Print a Serve config file for `serve deploy` instead of deploying.")
]
KeepServingOption = Annotated[
    bool, typer.Option("--keep-serving", help="On an embedded Ray, keep the app up until Ctrl-C.")
]


@app.command("serve")
def serve_cmd(config: ConfigOption = None, overrides: Overrides = None, build: BuildOption = False) -> None:
    """Serve the base model and its adapters with Ray Serve: an OpenAI-compatible API, batching, autoscaling."""
    from serve import app as serve_app

    with _exit_on((ConfigError, FileNotFoundError, OSError)):
        run = load_config(config, overrides or [])
        if build:
            serve_app.check(run)
            results.print(serve_app.serve_config(run), highlight=False, markup=False, end="")
            return
        deployed = serve_app.deploy(run)
    _print(serve_app.serving_summary(run, deployed))
    if serve_app.embedded(run):
        console.print("embedded Ray: the app stops with this process (Ctrl-C or SIGTERM drain it first)", highlight=False)
        serve_app.serve_until_stopped(run)


@app.command()
def pipeline(config: ConfigOption = None, overrides: Overrides = None, keep_serving: KeepServingOption = False) -> None:
    """Train (or sweep, with a tune: section), evaluate the best adapter against the base, serve it, smoke-test it."""
    from ray.train import TrainingFailedError

    from jobs.pipeline import PipelineFailed
    from jobs.pipeline import pipeline as run_pipeline
    from serve import app as serve_app

    with (
        _exit_on((TrainingFailedError, PipelineFailed), 1, "pipeline failed"),
        _exit_on((ConfigError, DataError, FileNotFoundError)),
    ):
        run = load_config(config, overrides or [])
        outcome = run_pipeline(run)
    _print(outcome.summary_md)
    endpoint = f"{outcome.endpoint}  (model {outcome.adapter_name!r})"
    copied = outcome.published and f"{outcome.published} (the app loads the adapter from there)"
    _print_where(
        adapter=outcome.adapter, report=outcome.summary, eval=outcome.eval_report, endpoint=endpoint, copied_to=copied
    )
    if serve_app.embedded(run):
        if not keep_serving:
            again = (
                f"serve.adapter_root={run.promote.registry}"
                if outcome.gate
                else f"serve.adapters.{outcome.adapter_name}={outcome.adapter}"
            )
            console.print(
                f"embedded Ray: the app stops now; serve it again with: lorafleet serve --config {config} {again}",
                highlight=False,
            )
            return
        serve_app.serve_until_stopped(run)


AddressOption = Annotated[
    Optional[str],
    typer.Option("--address", help="Ray dashboard address; default: RAY_ADDRESS, else http://127.0.0.1:8265."),
]


@app.command()
def submit(
    stage: Annotated[str, typer.Argument(help="train, sweep, serve, eval or pipeline.")],
    config: ConfigOption = None,
    overrides: Overrides = None,
    address: AddressOption = None,
    env: Annotated[
        Optional[list[str]], typer.Option("--env", help="Pass this environment variable to the job (repeatable).")
    ] = None,
    install: Annotated[
        bool,
        typer.Option(
            "--install", help="Install the pinned dependencies in the job's runtime env (else the cluster's)."
        ),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Stream the logs and exit with the job's status.")
    ] = True,
) -> None:
    """Submit a stage as a Ray job (this repository as its working dir); exit code = the job's final status."""
    from jobs import submit as jobs_submit

    with _exit_on((ConfigError,)):
        client, job_id = jobs_submit.submit(stage, config, overrides or [], address, env or [], install)
    console.print(f"submitted {job_id}: lorafleet jobs logs {job_id} --follow", highlight=False)
    if not wait:
        results.print(job_id)
        return
    info = jobs_submit.follow(client, job_id, lambda line: results.print(line, highlight=False, markup=False))
    console.print(jobs_submit.outcome(job_id, info), highlight=False, markup=False)
    raise typer.Exit(jobs_submit.exit_code(info.status))


jobs_app = typer.Typer(no_args_is_help=True, help="Ray jobs on the cluster: list, status, logs, stop.")
app.add_typer(jobs_app, name="jobs")
app.add_typer(registry_app, name="registry")


@jobs_app.command("list")
def jobs_list(address: AddressOption = None) -> None:
    """Every job on the cluster, newest last."""
    from jobs.submit import client

    for job in sorted(client(address).list_jobs(), key=lambda j: j.start_time or 0):
        results.print(
            f"{job.submission_id or job.job_id}  {job.status.value:<9}  {job.entrypoint}", highlight=False, markup=False
        )


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOption = None) -> None:
    """A job's status and message; exit code 0 only for SUCCEEDED."""
    from jobs.submit import client, exit_code

    info = client(address).get_job_info(job_id)
    results.print(
        f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""), highlight=False, markup=False
    )
    if info.status.is_terminal():
        raise typer.Exit(exit_code(info.status))


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: AddressOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")] = False,
) -> None:
    """A job's logs (driver output, including the error of a failed job)."""
    from jobs import submit as jobs_submit

    client = jobs_submit.client(address)
    if follow:
        jobs_submit.follow(client, job_id, lambda line: results.print(line, highlight=False, markup=False))
    else:
        results.print(client.get_job_logs(job_id), highlight=False, markup=False, end="")


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOption = None) -> None:
    """Ask the cluster to stop a running job."""
    from jobs.submit import client

    stopped = client(address).stop_job(job_id)
    results.print(f"{job_id}: {'stop requested' if stopped else 'not running'}", highlight=False)


def run_stage(stage: str) -> None:
    """`python -m jobs.<stage> ...` (the `ray job submit` entrypoint) runs the same command."""
    print(f"lorafleet {stage}: python {sys.executable}", file=sys.stderr, flush=True)  # which environment the job got
    app([stage, *sys.argv[1:]])


def main() -> None:
    app()
