"""Generators of the documentation's reference and benchmark pages, run by docs/hooks.py at build time.

Each module turns one source of truth into Markdown: the pydantic schema (config_reference), the typer
app (cli_reference), configs/*.yaml (configs_page), bench/results/*.json (benchmarks) and the root
CHANGELOG.md / CONTRIBUTING.md (includes). Nothing here is written into docs/: the pages exist only
in the built site.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
