"""Each benchmark's result file, bench/results/<name>.json: what the documentation's benchmark pages show.

A script calls `write_result` once, at the end of its main, with the rows of the table it prints (one
dict per row, the printed column names as keys and the printed cells as values, so the page shows the
same table) and its targets. The file also records where and how it ran: the commit (and whether the
tree had uncommitted changes), the UTC date, the machine (CPU model, cores, the CPU flags the 4-bit
kernels depend on), the Python and torch versions, the script's arguments and the command that
reproduces it.

    {"name", "script", "command", "args", "date", "duration_s", "commit": {"sha", "dirty"},
     "machine": {"cpu", "cores", "flags": {"avx512f", "avx512_bf16", "amx"}, "gpu"},
     "python", "torch", "figures": [{column: cell, ...}, ...], "targets": [{"name", "value", "unit", "goal", "met"}],
     "headline"}

A script that prints several tables passes {table title: rows}: each row then carries its table's title
under "table".
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("LORAFLEET_BENCH_RESULTS", REPO / "bench" / "results"))
_OPS = {">=": lambda v, g: v >= g, "<=": lambda v, g: v <= g, ">": lambda v, g: v > g, "<": lambda v, g: v < g,
        "==": lambda v, g: v == g}


def target(name: str, value: float, op: str, goal: float, unit: str = "") -> dict:
    """One target: `value op goal`, e.g. target("lorafleet / plain tokens/s", 0.91, ">=", 0.95)."""
    value = float(value)
    return {"name": name, "value": round(value, 6), "unit": unit.strip(), "goal": f"{op} {goal:g}{unit}", "met": bool(_OPS[op](value, goal))}


def markdown_row(row: dict) -> str:
    """A row dict as the printed Markdown table row."""
    return "| " + " | ".join(str(v) for k, v in row.items() if k != "table") + " |"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def machine() -> dict:
    cpu, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu is None:
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    found = {"cpu": cpu, "cores": os.cpu_count(),
             "flags": {"avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
                       "amx": any(f.startswith("amx") for f in flags)}, "gpu": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        found["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return found


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def _started() -> float | None:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - the duration is a nicety
        return None


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_result(name: str, args, rows, targets: list[dict] | None = None, headline: str | None = None) -> Path:
    """Write bench/results/<name>.json (LORAFLEET_BENCH_RESULTS: another folder) and return its path.

    `args`: the argparse namespace (or a dict); `rows`: the printed table's rows, or {title: rows} for
    several tables; `targets`: `target(...)` dicts; `headline`: the figure the benchmarks index shows
    when there is no target."""
    if isinstance(rows, dict):
        rows = [{"table": title, **row} for title, table in rows.items() for row in table]
    script = Path(sys.argv[0]).resolve()
    try:
        script_name = str(script.relative_to(REPO))
    except ValueError:
        script_name = script.name
    started = _started()
    sha, status = _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
    result = {
        "name": name,
        "script": script_name,
        "command": shlex.join(["python", script_name, *sys.argv[1:]]),
        "args": _jsonable(vars(args) if not isinstance(args, dict) else args),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1) if started else None,
        "commit": {"sha": sha, "dirty": bool(status) if status is not None else None},
        "machine": machine(),
        "python": platform.python_version(),
        "torch": _torch_version(),
        "figures": _jsonable(rows),
        "targets": _jsonable(targets or []),
        "headline": headline,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresult file: {path}", flush=True)
    return path
