"""A clean stop for `lorafleet serve` on an embedded Ray: on SIGTERM (what Kubernetes sends on every
rollout) or Ctrl-C, new requests get a 503 in OpenAI's format, requests in flight finish for up to
`serve.drain_timeout_s`, then Serve and Ray stop and the process exits 0, one log line per step.

The signal reaches only the process that deployed the app, while the API replicas live in Serve's
processes. A named actor carries it (Serve has no call that reaches every replica of a deployment):
each API replica waits on it in a thread, and once draining reports how many requests it still
holds. Apps deployed with `serve deploy` have no such actor; Serve's own graceful shutdown
(`graceful_shutdown_timeout_s`, set from the same setting) lets their replicas finish requests.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable

import ray
from ray import serve
from ray.exceptions import RayError

log = logging.getLogger("lorafleet.serve")
NAMESPACE = "lorafleet"
REPORT_EVERY_S = 0.1


def _name(app: str) -> str:
    return f"drain-{app}"


@ray.remote(num_cpus=0, max_concurrency=64)  # threaded: replicas block in wait() while others report
class DrainSignal:
    def __init__(self):
        self.started = threading.Event()
        self.replicas: set[str] = set()
        self.in_flight: dict[str, int] = {}

    def join(self, replica: str) -> None:
        self.replicas.add(replica)

    def wait(self, timeout_s: float) -> bool:
        return self.started.wait(timeout_s)

    def start(self) -> None:
        self.started.set()

    def report(self, replica: str, in_flight: int) -> None:
        self.in_flight[replica] = in_flight

    def busy(self) -> int | None:
        """Requests in flight over every API replica; None until each has reported since the drain began."""
        if not self.replicas <= self.in_flight.keys():
            return None
        return sum(self.in_flight[r] for r in self.replicas)


_held: dict[str, ray.actor.ActorHandle] = {}  # Ray ends an actor once no handle to it is left


def create(app: str) -> None:
    """The app's drain signal, before the app is deployed (API replicas look it up when they start)."""
    _held[app] = DrainSignal.options(name=_name(app), namespace=NAMESPACE, get_if_exists=True).remote()


class DrainWatch:
    """An API replica's side: `draining` turns true when the deploying process begins to drain."""

    def __init__(self, app: str, in_flight: Callable[[], int]):
        self.draining = False
        try:
            self.signal = ray.get_actor(_name(app), namespace=NAMESPACE)
        except ValueError:  # deployed with `serve deploy` or on a cluster: Serve's graceful shutdown applies
            return
        self.replica = uuid.uuid4().hex
        self.signal.join.remote(self.replica)
        threading.Thread(target=self._watch, args=(in_flight,), daemon=True, name="lorafleet-drain").start()

    def _watch(self, in_flight: Callable[[], int]) -> None:
        try:
            while not ray.get(self.signal.wait.remote(60)):
                pass
            self.draining = True
            while True:
                ray.get(self.signal.report.remote(self.replica, in_flight()))
                time.sleep(REPORT_EVERY_S)
        except RayError:  # the deploying process is gone, and the app with it
            return


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM takes Ctrl-C's path


def take_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt from now on, like Ctrl-C, where Ray's own handler would abort with a stack
    trace."""
    signal.signal(signal.SIGTERM, _stop)


def serve_until_stopped(app: str, timeout_s: float) -> None:
    """Keep an embedded Ray (and with it the app) up until SIGTERM or Ctrl-C, then drain and stop."""
    sys.stdout.flush()  # the endpoint must show in a redirected log while the process waits
    take_sigterm()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the drain short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    drain(app, timeout_s)


def drain(app: str, timeout_s: float) -> None:
    log.info(
        "stopping: new requests get 503; requests in flight have %.0f s to finish (serve.drain_timeout_s)", timeout_s
    )
    drain_signal = _held[app]
    ray.get(drain_signal.start.remote())
    deadline = time.monotonic() + timeout_s
    busy = None
    while time.monotonic() < deadline:
        busy = ray.get(drain_signal.busy.remote())
        if busy == 0:
            break
        time.sleep(REPORT_EVERY_S)
    if busy == 0:
        log.info("drained: every request in flight has finished")
    else:
        log.warning("drain timeout: %s request(s) still in flight are cut", "some" if busy is None else busy)
    serve.shutdown()
    log.info("Serve stopped")
    ray.shutdown()
    log.info("Ray stopped; exiting")
