"""`python -m tune --config FILE [overrides]`: the sweep as a Ray job entrypoint."""

from jobs.cli import run_stage

run_stage("sweep")
