"""reference/cli.md from the typer app: every command and command group, its help, usage, arguments
and options, read from the click command typer builds (`typer.main.get_command`)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import typer

from .markdown import code, table, text


@dataclass
class Command:
    path: str  # "lorafleet jobs logs"
    command: object  # the click command
    context: object  # its click context (for usage lines and help records)

    @property
    def is_group(self) -> bool:
        return hasattr(self.command, "commands")

    @property
    def anchor(self) -> str:
        return "-".join(self.path.split()[1:]) or "lorafleet"


def commands(app: typer.Typer, name: str = "lorafleet") -> Iterator[Command]:
    """The root group, then every command in the order `--help` lists them, groups followed by their commands."""
    root = typer.main.get_command(app)

    def walk(command, context, path: str) -> Iterator[Command]:
        yield Command(path, command, context)
        if hasattr(command, "commands"):
            for sub in command.list_commands(context):
                child = command.get_command(context, sub)
                if child is None or child.hidden:
                    continue
                yield from walk(child, child.context_class(child, info_name=sub, parent=context), f"{path} {sub}")

    yield from walk(root, root.context_class(root, info_name=name), name)


def command_paths(app: typer.Typer) -> list[str]:
    """Every command the reference lists below the root: "lorafleet train", "lorafleet jobs logs", ..."""
    return [c.path for c in commands(app)][1:]


def _help(command) -> tuple[str, str]:
    """The first paragraph (the one-line summary `--help` shows) and the rest."""
    paragraphs = inspect.cleandoc(command.help or "").split("\n\n")
    first = " ".join(paragraphs[0].split())
    return first, "\n\n".join(" ".join(p.split()) for p in paragraphs[1:])


def _params(c: Command) -> str:
    arguments, options = [], []
    for param in c.command.params:
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(c.context)
        names, described = (record if record else (param.name, ""))
        if param.param_type_name == "argument":
            required = "required" if param.required else "optional"
            many = ", repeatable" if param.nargs == -1 else ""
            described = described.replace("[required]", "").strip()
            arguments.append([code(param.name), f"{required}{many}", text(described)])
        else:
            options.append([code(names), text(described)])
    out = []
    if arguments:
        out += ["", "**Arguments**", "", table(["argument", "", "description"], arguments)]
    options.append([code("--help"), "Show the command's help and exit."])
    out += ["", "**Options**", "", table(["option", "description"], options)]
    return "\n".join(out)


def page(app: typer.Typer | None = None) -> str:
    if app is None:
        from jobs.cli import app
    found = list(commands(app))
    root = found[0]
    summary, rest = _help(root.command)
    out = [
        "# Command line",
        "",
        f"Generated at build time from the typer app in `jobs/cli.py`. {text(summary)}",
        "",
        ("Every command that runs a stage takes `--config FILE.yaml` and then dotted overrides of any field of the "
        "[configuration](configuration.md), e.g. `lorafleet train --config configs/demo.yaml training.max_steps=20`. "
        "A known failure (a config error, bad data, a missing adapter) ends with one readable line on stderr and a "
        "non-zero exit code, not a traceback; `lorafleet <command> --help` prints the help below."),
        "",
        table(["command", "what it does"],
              [[f"[{code(c.path)}](#{c.anchor})", text(_help(c.command)[0])] for c in found[1:]]),
    ]
    for c in found[1:]:
        level = "##" if c.path.count(" ") == 1 else "###"
        first, rest = _help(c.command)
        usage = c.command.get_usage(c.context).removeprefix("Usage: ").strip()
        out += ["", f"{level} {code(c.path)} {{ #{c.anchor} }}", "", text(first)]
        if rest:
            out += ["", text(rest)]
        out += ["", "```text", usage, "```"]
        if c.is_group:
            subs = [s for s in found if s.path.startswith(c.path + " ") and s.path.count(" ") == c.path.count(" ") + 1]
            out += ["", table(["command", "what it does"], [[f"[{code(s.path)}](#{s.anchor})", text(_help(s.command)[0])] for s in subs])]
        else:
            out.append(_params(c))
    return "\n".join(out) + "\n"
