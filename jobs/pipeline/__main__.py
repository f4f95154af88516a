"""`python -m jobs.pipeline`: the `lorafleet pipeline` command (what `ray job submit` runs)."""

from jobs.cli import run_stage

run_stage("pipeline")
