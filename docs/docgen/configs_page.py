"""reference/configs.md: each shipped config (configs/*.yaml) with its opening comment and the whole file."""

from __future__ import annotations

import re
from pathlib import Path

from . import REPO
from .markdown import code, text

_LABEL = re.compile(r"^[A-Z][\w ]*:\s")  # "Run: ...", "Train only: ...", "Your data: ..."


def header(source: str) -> list[str]:
    """The file's opening comment lines, joined into items: a line continues the one before unless it
    starts with a label ("Run: ...") or the one before ended a sentence."""
    items: list[str] = []
    for line in source.splitlines():
        if not line.startswith("#"):
            break
        line = line.lstrip("#").strip()
        if not line:
            continue
        if items and not _LABEL.match(line) and not items[-1].endswith((".", ")", ":")):
            items[-1] += " " + line
        else:
            items.append(line)
    return items


_COMMAND = re.compile(r"^([A-Z][\w ]*): ((?:lorafleet|python|make) .*?)(\s{2,}.*)?$")


def item_text(item: str) -> str:
    """A header item as Markdown: the command of a "Run: lorafleet ..." line in code, its remark as text."""
    match = _COMMAND.match(item)
    if not match:
        return text(item)
    label, command, remark = match.groups()
    return f"{text(label)}: {code(command)}" + (f" {text(remark.strip())}" if remark else "")


def page(folder: Path | None = None) -> str:
    folder = folder or REPO / "configs"
    files = sorted(folder.glob("*.yaml"))
    out = [
        "# Shipped configs",
        "",
        ("Generated at build time from `configs/*.yaml`: every config in the repository, its opening comment and "
        "the whole file. Each is a complete, validated starting point; copy one and change what differs, or "
        "override keys on the command line. The keys are described in the [configuration reference](configuration.md)."),
        "",
        "| config | what it is |",
        "| --- | --- |",
    ]
    summaries = {f: (header(f.read_text()) or [""])[0] for f in files}
    out += [f"| [{code(f.name)}](#{f.stem}) | {text(summaries[f])} |" for f in files]
    for f in files:
        source = f.read_text()
        items = header(source)
        out += ["", f"## {code(f.name)} {{ #{f.stem} }}", ""]
        if items:
            out += [text(items[0]), ""]
            out += [f"- {item_text(item)}" for item in items[1:]]
            out.append("")
        out += [f"```yaml title=\"configs/{f.name}\"", source.rstrip("\n"), "```"]
    return "\n".join(out) + "\n"
