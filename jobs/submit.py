"""Ray job submission: `lorafleet submit STAGE` and `lorafleet jobs list|status|logs|stop`.

A stage is submitted as `python -m <module> --config ... overrides` with this repository as the
job's working dir, the way `ray job submit --working-dir .` does, through Ray's Job Submission
SDK. The config is validated here first, so a bad config fails before the cluster sees a job.

A cluster started with `ray start` after `ray get-auth-token --generate` checks a token, and the
SDK sends it only when RAY_AUTH_MODE=token. When a token is there (~/.ray/auth_token,
RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) and the mode is unset, it is set here; a cluster that
checks no token gets a warning before anything is submitted to it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import tomllib
from pathlib import Path

from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
from ray.job_submission import JobDetails, JobErrorType, JobStatus, JobSubmissionClient

from jobs import cluster
from jobs.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
STAGES = {
    "train": "jobs.train",
    "sweep": "tune",
    "serve": "serve",
    "eval": "jobs.evaluation",
    "pipeline": "jobs.pipeline",
}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def client(address: str | None) -> JobSubmissionClient:
    # With RAY_AUTH_MODE unset, Ray's own rule: token mode when RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    # ~/.ray/auth_token holds a token. It also refreshes Ray's cached config: setting the variable alone
    # comes too late once ray is imported, and the request goes out without the token.
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)


def pinned_dependencies() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def runtime_env(env_names: list[str], install: bool) -> dict:
    env = {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": cluster.passed_env(env_names)}
    if install:  # otherwise the cluster image (or cluster.yaml's setup_commands) provides them
        env["pip"] = pinned_dependencies()
    return env


def entrypoint(stage: str, config: str | None, overrides: list[str]) -> str:
    """The job's command, after checking the config here (paths as the job will see them)."""
    if stage not in STAGES:
        raise ConfigError([f"STAGE = {stage!r}: unknown stage; use one of {', '.join(STAGES)}"], "submit")
    path = Path(config).resolve() if config else None
    if path and not path.is_relative_to(REPO):
        raise ConfigError(
            [
                f"--config = {config!r}: the job only sees this repository (its working dir); put the config under "
                f"{REPO}"
            ],
            "submit",
        )
    load_config(path, overrides)
    args = ["--config", str(path.relative_to(REPO))] if path else []
    return shlex.join(["python", "-m", STAGES[stage], *args, *overrides])


def submit(
    stage: str, config: str | None, overrides: list[str], address: str | None, env_names: list[str], install: bool
) -> tuple[JobSubmissionClient, str]:
    jobs = client(address)
    cluster.warn_if_auth_off(jobs.get_address())
    job_id = jobs.submit_job(
        entrypoint=entrypoint(stage, config, overrides),
        runtime_env=runtime_env(env_names, install),
        metadata={"lorafleet_stage": stage},
    )
    return jobs, job_id


def follow(jobs: JobSubmissionClient, job_id: str, echo) -> JobDetails:
    """Stream the job's logs until it ends; its final status and message."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            echo(lines.rstrip("\n"))

    asyncio.run(tail())
    return jobs.get_job_info(job_id)


def outcome(job_id: str, info: JobDetails) -> str:
    """The final line for a job, with Ray's message when it did not succeed. A job that fails before its
    entrypoint runs (its runtime env could not be built: a pip error, a full disk) has no logs, so the
    message is the only account of why. An entrypoint's failure repeats the streamed log tail after its
    first line; that line is enough."""
    shown = f"job {job_id}: {info.status.value}"
    if info.status == JobStatus.SUCCEEDED or not info.message:
        return shown
    entrypoint_failed = info.error_type == JobErrorType.JOB_ENTRYPOINT_COMMAND_ERROR.value
    return f"{shown}: {info.message.splitlines()[0] if entrypoint_failed else info.message}"


def exit_code(status: JobStatus) -> int:
    return 0 if status == JobStatus.SUCCEEDED else 1
