"""benchmarks/*.md from the result files the bench scripts write (bench/results/<name>.json, see
bench/results.py) and the prose kept beside them (docs/benchmarks/_<page>.md).

A template is Markdown with markers: `<!-- result: NAME -->` becomes the rendering of
bench/results/NAME.json (machine, settings, command, tables, targets), or, while that file does not
exist, a note with the command that writes it; `<!-- benchmarks -->` (in _index.md) becomes the table
of every benchmark with its headline figure and whether its targets were met.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import REPO
from .markdown import code, table, text


@dataclass(frozen=True)
class Benchmark:
    page: str  # benchmarks/<page>.md
    title: str
    summary: str  # one line on the index
    results: dict[str, str]  # result name -> the command that writes it


BENCHMARKS = [
    Benchmark("train-throughput", "Training throughput",
              "`lorafleet train` (Ray Train, one worker) against a plain Trainer + PEFT script: trained tokens/s and peak memory; padded against padding-free batches.",
              {"train_throughput": "python bench/train_throughput.py", "train_throughput_packing": "python bench/train_throughput.py --packing"}),
    Benchmark("data-scale", "Data at scale",
              "The driver loader against Ray Data from 10k to 1M rows: rows/s on 1 and 2 CPUs, driver memory, time to a worker's first batch.",
              {"data_scale": "python bench/data_scale.py"}),
    Benchmark("cpu-4bit-kernels", "4-bit kernels on CPU",
              "bitsandbytes' fused CPU kernel against lorafleet's single 4-bit path: eval logits, gradients after an evaluation, generation time.",
              {"cpu_4bit_kernels": "python bench/cpu_4bit_kernels.py"}),
    Benchmark("sweep-efficiency", "Sweep efficiency",
              "ASHA against FIFO on the same sampled trials: trial-steps spent and the best eval loss reached.",
              {"sweep_efficiency": "python bench/sweep_efficiency.py"}),
    Benchmark("serve-load", "Serving under load",
              "Serve's overhead, batching, multiplexed adapters' memory, adapter cold load, the vLLM and HF engines, autoscaling.",
              {"serve_load": "python bench/serve_load.py", "serve_engines": "python bench/serve_load.py --parts engines"}),
    Benchmark("serve-faults", "Serving under faults",
              "A model replica killed under load: failed requests, the longest gap between answers, recovery time, with and without resends.",
              {"serve_faults": "python bench/serve_faults.py"}),
    Benchmark("gpu-check", "GPU check",
              "lorafleet's GPU paths on a lent CUDA machine: QLoRA steps, adapter reload, two adapters in one batch, packing, speed against a plain script, Ray Train.",
              {"gpu_check": "make gpu-check"}),
]

_RESULT = re.compile(r"<!--\s*result:\s*([\w-]+)\s*-->")
_INDEX = re.compile(r"<!--\s*benchmarks\s*-->")


def load(name: str, folder: Path | None = None) -> dict | None:
    path = (folder or REPO / "bench" / "results") / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _number(value: float, unit: str = "") -> str:
    number = f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return number + (unit if unit in ("", "%", "x") else f" {unit}")


_NUMERIC = re.compile(r"^(\*\*)?[-+]?[\d.,]+(e[-+]?\d+)?( of [\d,]+)?[%x]?(\*\*)?( \(.*\))?$|^-$")


def _cell(value) -> str:
    """A table cell as the script printed it (Markdown already), kept from splitting the row or opening a tag."""
    return str(value).replace("|", "\\|").replace("<", "&lt;")


def _date(value: str | None) -> str:
    if not value:
        return "unknown date"
    try:
        when = datetime.datetime.fromisoformat(value).astimezone(datetime.UTC)
    except ValueError:
        return text(value)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float | None) -> str:
    if not seconds:
        return ""
    return f" ({seconds:.0f} s)" if seconds < 120 else f" ({seconds / 60:.0f} min)"


def _tables(figures: list[dict]) -> list[tuple[str | None, list[dict]]]:
    """The result's rows grouped by their "table" title, in order (one untitled table when none has one)."""
    grouped: dict[str | None, list[dict]] = {}
    for row in figures:
        grouped.setdefault(row.get("table"), []).append({k: v for k, v in row.items() if k != "table"})
    return list(grouped.items())


def _machine(m: dict) -> str:
    flags = m.get("flags", {})
    words = ", ".join(f"{label} {'yes' if flags.get(key) else 'no'}"
                      for key, label in (("avx512f", "AVX-512F"), ("avx512_bf16", "AVX-512 BF16"), ("amx", "AMX")))
    return f"{text(m.get('cpu') or 'unknown CPU')}, {m.get('cores')} cores ({words}); {text(m.get('gpu') or 'no GPU')}"


def targets_table(targets: list[dict]) -> str:
    return table(["target", "value", "goal", "met"],
                 [[text(t["name"]), text(_number(t["value"], t.get("unit", ""))), code(t["goal"]),
                   "yes" if t["met"] else "**no**"] for t in targets], ["l", "r", "l", "l"])


def render_result(name: str, result: dict | None, command: str) -> str:
    if result is None:
        return "\n".join([
            '!!! note "Not run yet"',
            f"    There is no result file `bench/results/{name}.json` yet. This writes it (part of `make bench`):",
            "",
            "    ```bash",
            f"    {command}",
            "    ```",
            "",
            "    then build the docs again.",
        ])
    commit = result.get("commit") or {}
    sha = (commit.get("sha") or "unknown")[:10]
    dirty = " with uncommitted changes" if commit.get("dirty") else ""
    software = f"Python {result.get('python')}" + (f", torch {result['torch']}" if result.get("torch") else "")
    settings = ", ".join(code(f"{k}={json.dumps(v) if not isinstance(v, str) else v}") for k, v in result.get("args", {}).items())
    out = [
        (f"**Latest run**: {_date(result.get('date'))}{_duration(result.get('duration_s'))}, commit {code(sha)}{dirty}, "
        f"from `bench/results/{name}.json`:"),
        "",
        f"- machine: {_machine(result.get('machine', {}))}",
        f"- software: {text(software)}",
        f"- settings: {settings or 'the defaults'}",
        "",
        "```bash",
        result.get("command", command),
        "```",
    ]
    for title, rows in _tables(result.get("figures", [])):
        if not rows:
            continue
        columns = list(rows[0])
        cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
        align = ["r" if i and all(_NUMERIC.match(row[i]) for row in cells) else "l" for i in range(len(columns))]
        out += [""] + ([f"**{text(title)}**", ""] if title else [])
        out.append(table([text(c) for c in columns], cells, align))
    if result.get("targets"):
        out += ["", "**Targets**", "", targets_table(result["targets"])]
    return "\n".join(out)


def _template(page: str, docs: Path) -> str | None:
    path = docs / "benchmarks" / f"_{page}.md"
    return path.read_text() if path.is_file() else None


def page(bench: Benchmark, docs: Path | None = None, results: Path | None = None) -> str:
    docs = docs or REPO / "docs"
    source = _template(bench.page, docs) or f"# {bench.title}\n\n{bench.summary}\n"
    missing = [name for name in bench.results if not re.search(rf"<!--\s*result:\s*{re.escape(name)}\s*-->", source)]
    if missing:
        source += "".join(f"\n<!-- result: {name} -->\n" for name in missing)

    def replace(match: re.Match) -> str:
        name = match.group(1)
        command = bench.results.get(name, f"python bench/{name}.py")
        return render_result(name, load(name, results), command)

    return _RESULT.sub(replace, source)


def status(bench: Benchmark, results: Path | None = None) -> tuple[str, str, str]:
    """The index's cells: latest run date, headline figure, targets."""
    found = [r for r in (load(name, results) for name in bench.results) if r is not None]
    if not found:
        return "not run yet", "-", "-"
    date = max(r.get("date", "") for r in found)[:10]
    targets = [t for r in found for t in r.get("targets", [])]
    first = next((r for r in found if r.get("targets") or r.get("headline")), found[0])
    if first.get("headline"):
        headline = text(first["headline"])
    elif first.get("targets"):
        t = first["targets"][0]
        headline = f"{text(t['name'])}: {text(_number(t['value'], t.get('unit', '')))} (goal {code(t['goal'])})"
    else:
        headline = "-"
    if not targets:
        met = "no target"
    else:
        hits = sum(t["met"] for t in targets)
        met = f"all {hits} met" if hits == len(targets) else f"**{hits} of {len(targets)} met**"
    if len(found) < len(bench.results):
        met += f" ({len(bench.results) - len(found)} result file(s) missing)"
    return date, headline, met


def index(docs: Path | None = None, results: Path | None = None) -> str:
    docs = docs or REPO / "docs"
    rows = []
    for bench in BENCHMARKS:
        date, headline, met = status(bench, results)
        rows.append([f"[{text(bench.title)}]({bench.page}.md)", text(bench.summary), date, headline, met])
    listing = table(["benchmark", "what it measures", "latest run", "headline", "targets"], rows)
    source = _template("index", docs) or "# Benchmarks\n\n<!-- benchmarks -->\n"
    return _INDEX.sub(lambda _: listing, source) if _INDEX.search(source) else source + "\n" + listing + "\n"


def pages(docs: Path | None = None, results: Path | None = None) -> dict[str, str]:
    """Every benchmark page, by its path under docs/."""
    found = {"benchmarks/index.md": index(docs, results)}
    for bench in BENCHMARKS:
        found[f"benchmarks/{bench.page}.md"] = page(bench, docs, results)
    return found
