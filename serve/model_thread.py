"""The one thread that runs all of an HF engine replica's torch work: loading the model and adapters, every forward
pass, unloading.

Why one thread: torch's CPU ops run on OpenMP, and libgomp gives every thread that starts parallel work a team of its
own. Once two threads have teams on a machine with as many cores as one team's threads, small ops (a decoding step is
hundreds of them) ran about 1.5x slower in the second thread (measured on 2 cores: a loop of [32, 576] linears took
0.25 to 0.28 s instead of 0.15 to 0.19 s once the main thread had run torch work; a SmolLM2 decoding step of 32 rows,
0.34 s instead of 0.18 s). So the replica runs torch nowhere else.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class ModelThread:
    """Runs jobs (`call`) in order and, between them, the steady work (`work`: returns whether more is pending)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self.pending = False
        self.work: Callable[[], bool] | None = None
        threading.Thread(target=self._run, name="lorafleet-model", daemon=True).start()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the model thread; its result or exception arrives through the Future."""
        future: Future = Future()
        with self.cond:
            self.jobs.append((fn, future))
            self.cond.notify()
        return future

    def wake(self) -> None:
        """There is steady work to do (a request arrived)."""
        with self.cond:
            self.pending = True
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.jobs or self.pending)
                jobs, self.jobs, self.pending = list(self.jobs), deque(), False
            for fn, future in jobs:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # the caller's to handle
                    future.set_exception(exc)
            if self.work is not None and self.work():
                with self.cond:
                    self.pending = True
