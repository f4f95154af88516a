"""Imports go one way: entry points -> stages -> services -> ground, with no circle anywhere.

Every import is read from the source (`ast`), module-level and inside functions alike, the way
torchtune's tests guard that recipes never import its CLI. A new module must be given a layer here.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "tune", "serve")
ENTRY, STAGE, SERVICE, GROUND = range(4)
LAYER_NAMES = ("entry point", "stage", "service", "ground")
# The longest matching prefix decides; every `__main__` module is an entry point.
LAYERS = {
    "jobs.cli": ENTRY, "jobs.registry_cli": ENTRY, "jobs.submit": ENTRY, "jobs.pipeline": ENTRY,
    "jobs.train": STAGE, "jobs.evaluation": STAGE, "jobs.export": STAGE, "tune": STAGE, "serve": STAGE,
    "jobs.tracking": SERVICE, "jobs.model": SERVICE, "jobs.prompting": SERVICE, "jobs.conversations": SERVICE, "jobs.data": SERVICE, "jobs.demo_data": SERVICE, "jobs.generate": SERVICE,
    "jobs.storage": SERVICE, "jobs.registry": SERVICE, "jobs.report": SERVICE, "jobs.cluster": SERVICE, "jobs.packaged": SERVICE,
    "jobs.config": GROUND, "jobs.adapter": GROUND, "jobs.devices": GROUND, "jobs.metrics": GROUND,
}
# Besides the direction: Serve runs without the sweep's or the training job's code. In `jobs.data`, the two loaders
# stand on shared modules and never on each other, and only the package's entry (`jobs.data`) chooses between them.
DATA_LOADERS = ("jobs.data.driver", "jobs.data.ray_data")
DATA_SHARED = ("jobs.data.formats", "jobs.data.readers", "jobs.data.examples", "jobs.data.encoding", "jobs.data.statistics", "jobs.data.errors")
FORBIDDEN = {
    "serve": ("tune", "jobs.train"),
    "jobs.data.driver": ("jobs.data.ray_data",),
    "jobs.data.ray_data": ("jobs.data.driver",),
    **{shared: DATA_LOADERS for shared in DATA_SHARED},
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer(name: str) -> int | None:
    if name.endswith(".__main__"):
        return ENTRY
    matches = [prefix for prefix in LAYERS if _within(name, prefix)]
    return LAYERS[max(matches, key=len)] if matches else None


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Imports under `if TYPE_CHECKING:`: they name a type for annotations and never run."""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"]
    return {inner for block in blocks for inner in ast.walk(block)}


def imports(name: str, path: Path, known: dict[str, Path], with_type_checking: bool = True) -> set[str]:
    """The project modules `name` imports (`from jobs import cluster` names the module jobs.cluster)."""
    targets = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = set() if with_type_checking else _type_checking_only(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {t for t in targets if t.split(".")[0] in PACKAGES and t not in PACKAGES and t != name}


def graph(with_type_checking: bool = True) -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t in imports(name, path, known, with_type_checking) if t in known} for name, path in known.items()}


def test_every_module_has_a_layer():
    assert [name for name in modules() if name not in PACKAGES and layer(name) is None] == []


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{name} ({LAYER_NAMES[layer(name)]}) imports {target} ({LAYER_NAMES[layer(target)]})"
              for name, targets in graph().items() if name not in PACKAGES for target in targets if layer(target) < layer(name)]
    assert upward == []


def test_the_forbidden_imports_name_modules_that_exist():
    """A rule about a module that was renamed away would pass forever."""
    known = modules()
    named = [p for prefix, banned in FORBIDDEN.items() for p in (prefix, *banned)]
    assert [p for p in named if not any(_within(name, p) for name in known)] == []


def test_serve_never_imports_the_sweep_or_the_training_job_and_the_data_loaders_never_each_other():
    wrong = [f"{name} imports {target}" for name, targets in graph().items() for prefix, banned in FORBIDDEN.items() if _within(name, prefix)
             for target in targets if any(_within(target, b) for b in banned)]
    assert wrong == []


def test_no_import_circle():
    edges = graph(with_type_checking=False)  # a circle only through annotations never runs
    circles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert circles == []


def test_the_guard_sees_an_upward_import(tmp_path):
    """The checks above would pass on a tree they cannot read; this one shows they read imports."""
    stage = tmp_path / "stage.py"
    stage.write_text("def main():\n    from jobs.cli import run_stage\n    from . import report\n")
    known = {"jobs.cli": Path(), "jobs.report": Path()}
    assert imports("jobs.train", stage, known) == {"jobs.cli", "jobs.report"}
    assert layer("jobs.cli") < layer("jobs.train") < layer("jobs.report") < layer("jobs.config.schema")
    assert layer("jobs.train.__main__") == ENTRY and layer("tune.sweep") == STAGE
