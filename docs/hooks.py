"""MkDocs hooks: the generated pages, made at every build from their sources (docs/docgen/).

reference/configuration.md (jobs/config/schema.py), reference/cli.md (jobs/cli.py), reference/configs.md
(configs/*.yaml), changelog.md and contributing.md (the root CHANGELOG.md and CONTRIBUTING.md) and
benchmarks/*.md (bench/results/*.json with docs/benchmarks/_*.md) are added to the build's files; none
is written into docs/, so `mkdocs build` alone makes the whole site and nothing generated is committed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
for path in (str(REPO), str(DOCS)):  # jobs/ (for a checkout that is not pip-installed) and docgen/
    if path not in sys.path:
        sys.path.insert(0, path)

from docgen import benchmarks, cli_reference, config_reference, configs_page, includes

log = logging.getLogger("mkdocs.hooks.lorafleet")

# Sources whose change rebuilds the site under `mkdocs serve`.
WATCHED = ["jobs/config", "jobs/cli.py", "configs", "bench/results", "CHANGELOG.md", "CONTRIBUTING.md", "docs/docgen"]


def generated_pages() -> dict[str, str]:
    """Every generated page's Markdown, by its path under docs/."""
    return {
        "reference/configuration.md": config_reference.page(),
        "reference/cli.md": cli_reference.page(),
        "reference/configs.md": configs_page.page(),
        "changelog.md": includes.page("CHANGELOG.md", "changelog.md"),
        "contributing.md": includes.page("CONTRIBUTING.md", "contributing.md"),
        **benchmarks.pages(DOCS),
    }


def on_files(files: Files, config) -> Files:
    for uri, content in generated_pages().items():
        existing = files.get_file_from_path(uri)
        if existing is not None:
            log.warning("docs/%s is generated at build time; the file in docs/ is ignored (delete it)", uri)
            files.remove(existing)
        files.append(File.generated(config, uri, content=content))
    return files


def on_serve(server, config, builder):
    for path in WATCHED:
        if (REPO / path).exists():
            server.watch(str(REPO / path))
    return server
