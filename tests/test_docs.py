"""The documentation site: `mkdocs build --strict` passes, and the generated reference pages cover the
code they are generated from (every config field, every command and option), so a new field or
command cannot go undocumented. One build, shared by the module."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import sys
import types
import typing
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel, Field, SecretStr

from jobs.cli import app
from jobs.config.schema import RunConfig
from tests.subprocesses import output, run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
from docgen import benchmarks, config_reference, includes


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", out], cwd=REPO,
               env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert done.returncode == 0, output(done)
    return out


def page_text(site: Path, page: str) -> str:
    """A built page's article as plain text (tags dropped, entities decoded)."""
    path = site / page / "index.html"
    assert path.is_file(), f"{page} is missing from the built site"
    article = re.search(r"<article.*?</article>", path.read_text(), re.DOTALL)
    return html.unescape(re.sub(r"<[^>]+>", "", article.group(0)))


def nested(annotation) -> list[tuple[str, type[BaseModel]]]:
    """Models inside a field's type, with the suffix the reference gives their keys."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict:
        return [(".<key>" + s, m) for s, m in nested(args[1])]
    if origin is list:
        return [("[]" + s, m) for s, m in nested(args[0])]
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args for found in nested(arg)]
    return []


def dotted_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field's dotted key, nested models walked through model_fields: model.name, tune.space.<key>.choice, ..."""
    found = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        found.append(path)
        for suffix, inner in nested(field.annotation):
            found += dotted_fields(inner, path + suffix)
    return found


def test_site_builds_strict_with_every_nav_page(site):
    for page in ("", "reference/configuration", "reference/cli", "reference/configs", "reference/http-api", "benchmarks",
                 *(f"benchmarks/{b.page}" for b in benchmarks.BENCHMARKS), "changelog", "contributing"):
        assert (site / page / "index.html").is_file(), f"{page or 'home'} is missing from the built site"


def test_configuration_reference_names_every_field(site):
    text = page_text(site, "reference/configuration")
    keys = [key for key in dotted_fields(RunConfig) if "." in key]
    assert len(keys) > 100
    missing = [key for key in keys if key not in text]
    assert not missing, f"fields missing from the configuration reference: {missing}"
    built = (site / "reference/configuration/index.html").read_text()
    assert not [s for s in RunConfig.model_fields if f'id="{s}"' not in built], "a section has no heading"


def test_configuration_reference_walks_any_nesting():
    class Leaf(BaseModel):
        depth: int = Field(1, gt=0, description="How deep.")

    class Inner(BaseModel):
        leaf: Leaf = Field(default_factory=Leaf, description="A nested section.")
        leaves: list[Leaf] = Field(default_factory=list, description="A list of them.")
        token: SecretStr | None = Field(None, description="A secret.")

    class Root(BaseModel):
        inner: Inner = Field(default_factory=Inner, description="The section.")
        named: dict[str, Inner] = Field(default_factory=dict, description="Named sections.")

    markdown = config_reference.page(Root)
    for key in dotted_fields(Root):
        if "." in key:
            assert f"`{key}`" in markdown, key
    assert "inner.leaf.depth" in config_reference.field_paths(Root)
    assert "named.<key>.leaves[].depth" in config_reference.field_paths(Root)


def test_cli_reference_names_every_command_and_option(site):
    text = page_text(site, "reference/cli")
    root = typer.main.get_command(app)

    def walk(group, path):
        for name, command in group.commands.items():
            yield f"{path} {name}", command
            if hasattr(command, "commands"):
                yield from walk(command, f"{path} {name}")

    commands = list(walk(root, "lorafleet"))
    assert {"lorafleet train", "lorafleet serve", "lorafleet jobs logs"} <= {path for path, _ in commands}
    for path, command in commands:
        assert path in text, f"{path} is missing from the CLI reference"
        for param in command.params:
            for name in [*param.opts, *param.secondary_opts] if param.param_type_name == "option" else [param.name]:
                assert name in text, f"{path}: {name} is missing from the CLI reference"


def test_http_api_and_benchmark_pages_are_built(site):
    assert "/v1/" in page_text(site, "reference/http-api")
    index = page_text(site, "benchmarks")
    for bench in benchmarks.BENCHMARKS:
        assert bench.title in index
        assert bench.title in page_text(site, f"benchmarks/{bench.page}")


def test_no_page_loads_anything_from_another_host(site):
    remote = re.compile(r"<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)=\"(?:https?:)?//", re.IGNORECASE)
    offending = [str(p.relative_to(site)) for p in site.rglob("*.html") if remote.search(p.read_text())]
    assert not offending, f"pages that load from another host: {offending}"


def test_benchmark_page_renders_a_result_file(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_results", REPO / "bench" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / "sweep_efficiency.py"), "--trials", "4"])
    bench = next(b for b in benchmarks.BENCHMARKS if b.page == "sweep-efficiency")
    assert "Not run yet" in benchmarks.page(bench, results=tmp_path)

    rows = [{"Scheduler": "FIFO", "Trial-steps": "432"}, {"Scheduler": "ASHA", "Trial-steps": "112"}]
    results.write_result("sweep_efficiency", {"trials": 4}, rows, [results.target("ASHA / FIFO trial-steps", 25.9, "<=", 40, "%")])
    markdown = benchmarks.page(bench, results=tmp_path)
    assert "| ASHA | 112 |" in markdown
    assert "python bench/sweep_efficiency.py --trials 4" in markdown
    assert "| ASHA / FIFO trial-steps | 25.9% | `<= 40%` | yes |" in markdown
    _, headline, met = benchmarks.status(bench, tmp_path)
    assert met == "all 1 met" and "25.9%" in headline


def test_included_root_pages_link_into_the_site():
    source = "[install](docs/install.md) [api](docs/reference/http-api.md#errors) [home](README.md) [code](jobs/cli.py) `[kept](guides/x.md)`"
    assert includes.rewrite_links(source, "contributing.md") == (
        "[install](install.md) [api](reference/http-api.md#errors) [home](index.md) code (`jobs/cli.py`) `[kept](guides/x.md)`\n")
