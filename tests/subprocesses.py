"""Subprocesses in tests and the loopback ports they listen on: a failure shows what the command printed."""

from __future__ import annotations

import shlex
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def output(done: subprocess.CompletedProcess, tail: int = 4000) -> str:
    return f"$ {shlex.join(map(str, done.args))}\nexit {done.returncode}\n--- stdout\n{done.stdout[-tail:]}\n--- stderr\n{done.stderr[-tail:]}"


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    """Run and capture; the caller asserts on the result with `output(done)` as the message."""
    return subprocess.run([str(c) for c in cmd] if isinstance(cmd, list) else cmd, capture_output=True, text=True, check=False, **kwargs)


def run_ok(cmd, **kwargs) -> subprocess.CompletedProcess:
    done = run(cmd, **kwargs)
    assert done.returncode == 0, output(done)
    return done
