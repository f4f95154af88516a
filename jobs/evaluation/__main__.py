"""`python -m jobs.evaluation`: the `lorafleet eval` command (what `ray job submit` runs)."""

from jobs.cli import run_stage

run_stage("eval")
