"""`python -m jobs.train`: the `lorafleet train` command (what `ray job submit` runs)."""

from jobs.cli import run_stage

run_stage("train")
