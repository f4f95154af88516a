"""`lorafleet registry publish | list | rollback`: versions of named adapters (`jobs.registry`).

    lorafleet registry publish REGISTRY NAME ADAPTER_DIR [--keep N]
    lorafleet registry list REGISTRY [NAME]
    lorafleet registry rollback REGISTRY NAME [--to VERSION]

REGISTRY is a folder or an s3:// / gs:// URI; the argument orders are a contract scripts rely on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from jobs import registry

app = typer.Typer(no_args_is_help=True, help="Versions of named adapters: publish, list, roll back.")
console = Console(stderr=True, soft_wrap=True)
results = Console(soft_wrap=True)
RegistryArg = Annotated[
    str, typer.Argument(help="The registry: a folder, or an s3:// / gs:// URI.", show_default=False)
]
NameArg = Annotated[str, typer.Argument(help="The adapter's name, as requests give it in `model`.", show_default=False)]


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


@app.command("publish")
def publish(
    registry_uri: RegistryArg,
    name: NameArg,
    adapter_dir: Annotated[
        Path, typer.Argument(help="The adapter folder (<training.output_dir>/adapter).", show_default=False)
    ],
    keep: Annotated[
        int, typer.Option("--keep", help="Versions kept per name; older ones are removed, never the current one.")
    ] = 10,
) -> None:
    """Write a new immutable version of NAME and make it current; prints the version."""
    try:
        version = registry.publish(registry_uri, name, adapter_dir, keep)
    except (registry.RegistryError, OSError) as exc:
        _fail(exc)
    results.print(
        f"{name}: version {version.number} published and current ({version.uri})", highlight=False, markup=False
    )


@app.command("list")
def list_versions(
    registry_uri: RegistryArg,
    name: Annotated[str | None, typer.Argument(help="Only this adapter.", show_default=False)] = None,
) -> None:
    """Every version, the current one marked, with when it was published, the run that trained it and, for a
    pipeline's version, the evaluation gate's decision."""
    try:
        chosen = [name] if name else registry.names(registry_uri)
        for each in chosen:
            now = registry.current(registry_uri, each)
            for version in registry.versions(registry_uri, each):
                mark = "*" if now and version.number == now.number else " "
                lineage = version.lineage
                where = f"  run {lineage['run']}" if lineage.get("run") else ""
                metrics = f"  {json.dumps(lineage['metrics'])}" if lineage.get("metrics") else ""
                gate = f"  gate: {version.gate['reason']}" if version.gate else ""
                results.print(
                    f"{mark} {each}@{version.number}  {version.published}{where}{metrics}{gate}",
                    highlight=False,
                    markup=False,
                )
    except (registry.RegistryError, OSError) as exc:
        _fail(exc)


@app.command("rollback")
def rollback(
    registry_uri: RegistryArg,
    name: NameArg,
    to: Annotated[
        int | None, typer.Option("--to", help="This version; default: the newest one below the current.")
    ] = None,
) -> None:
    """Make an earlier version of NAME current again."""
    try:
        version = registry.rollback(registry_uri, name, to)
    except (registry.RegistryError, OSError) as exc:
        _fail(exc)
    results.print(f"{name}: version {version.number} is current", highlight=False, markup=False)
