"""How this loader runs Ray Data: the cluster's CPUs, and materialized runs that use all of them."""

from __future__ import annotations

import ray
import ray.data


def cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def materialized(rows: ray.data.Dataset) -> ray.data.MaterializedDataset:
    """`rows.materialize()` with Ray Data's operator reservations off for this run only. They hold each operator of a
    stream to a share of the CPUs, which on a small cluster leaves a map to one task at a time (the benchmark docs show
    the cost). A run that is materialized keeps all its outputs anyway; the stream that feeds the Train workers keeps
    them, as they also bound how far it runs ahead of training."""
    context = rows.context
    before = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    try:
        done = rows.materialize()
    finally:
        context.op_resource_reservation_enabled = before
    done.context.op_resource_reservation_enabled = before  # its own copy of the context, made for the run
    return done
