"""`python -m serve --config ...`: the serve stage as a Ray job entrypoint."""

from jobs.cli import run_stage

run_stage("serve")
