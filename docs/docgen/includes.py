"""Pages that show a Markdown file from the repository's root (CHANGELOG.md, CONTRIBUTING.md), with its
links rewritten for the site: a link to docs/x.md or to another root page becomes a link to that page,
a link to any other file of the repository becomes its path in code (the site does not hold it)."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from . import REPO

# Root files that are pages of the site, and where.
ROOT_PAGES = {"README.md": "index.md", "CHANGELOG.md": "changelog.md", "CONTRIBUTING.md": "contributing.md",
              "RELIABILITY.md": "reliability.md"}
_LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)")
_CODE_SPAN = re.compile(r"((`+).+?\2)")


def _target(target: str, page: str) -> str | None:
    """The site-relative link for a repository-relative `target`, or None when the site lacks the file."""
    path, _, anchor = target.partition("#")
    path = posixpath.normpath(path.removeprefix("./"))
    if path in ROOT_PAGES:
        site = ROOT_PAGES[path]
    elif path.startswith("docs/") and path.endswith(".md"):
        site = path.removeprefix("docs/")
    else:
        return None
    relative = posixpath.relpath(site, posixpath.dirname(page) or ".")
    return relative + (f"#{anchor}" if anchor else "")


def rewrite_links(markdown: str, page: str) -> str:
    out, fenced = [], False
    for line in markdown.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
        if not fenced:
            def replace(match: re.Match) -> str:
                label, target = match.groups()
                if re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", target):  # a URL, an anchor, an absolute path
                    return match.group(0)
                site = _target(target, page)
                if site is not None:
                    return f"[{label}]({site})"
                return label if label.startswith("`") else f"{label} (`{target.partition('#')[0]}`)"
            # Links inside code spans are examples: left as written.
            parts = _CODE_SPAN.split(line)
            # split() gives [text, span, its backticks, text, ...]: the backticks are not text of their own.
            line = "".join(_LINK.sub(replace, part) if i % 3 == 0 else part for i, part in enumerate(parts) if i % 3 != 2)
        out.append(line)
    return "\n".join(out) + "\n"


def page(name: str, page_uri: str, root: Path | None = None) -> str:
    source = (root or REPO) / name
    if not source.is_file():
        title = Path(name).stem.capitalize()
        return f"# {title}\n\n`{name}` is not written yet; this page shows it once it is.\n"
    return rewrite_links(source.read_text(), page_uri)
