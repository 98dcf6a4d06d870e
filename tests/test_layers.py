"""The package's import layers, read from its own source (no import is executed).

Imports only go down this order (left is lower):

    root modules < kernels < models < data < generate < train < distill < eval < pipelines < cli

root modules are the top-level .py files (errors, validate, fsio, locks, dtypes, config, progress,
run_folder) and the package itself; pipelines are demo.py, pipeline.py, study.py and study_claims.py; cli is
commands/, every cli.py and __main__.py, and the
`if __name__ == "__main__":` block of any module (it runs only as a script). Every import counts:
module-level and function-local, relative and `forcelab.` absolute. On top of the order, no two
top-level packages/modules import each other (directly or through others), and the modules inside
kernels/, models/ and data/ have no import cycle among themselves.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "forcelab"
ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGE_CODE = ("tests", "bench", "docs")

LAYERS = ("root", "kernels", "models", "data", "generate", "train", "distill", "eval", "pipelines", "cli")
PIPELINES = {"forcelab.demo", "forcelab.pipeline", "forcelab.study", "forcelab.study_claims"}
CLI_FILES = {"cli", "__main__"}
CLI_PACKAGES = {"commands"}
ACYCLIC_PACKAGES = ("kernels", "models", "data")

@dataclass(frozen=True)
class Import:
    file: str  # path relative to the package root
    line: int
    source: str  # importing module, dotted
    target: str  # imported forcelab module, dotted
    script_only: bool  # inside `if __name__ == "__main__":`


def package_files() -> list[Path]:
    """The root's modules and every module of a package under it (a folder with __init__.py whose
    parents up to the root are packages too): never a virtual environment or a build folder."""
    def in_package(path: Path) -> bool:
        folders = path.relative_to(ROOT).parents
        return all((ROOT / f / "__init__.py").is_file() for f in folders if f != Path("."))

    candidates = [ROOT.glob("*.py")] + [d.rglob("*.py") for d in ROOT.iterdir()
                                        if d.is_dir() and d.name not in NOT_PACKAGE_CODE
                                        and (d / "__init__.py").is_file()]
    return sorted(p for found in candidates for p in found if in_package(p))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    if module.split(".")[0] != PACKAGE:
        return []
    # `from pkg import sub` imports the submodule pkg.sub when there is one
    subs = [f"{module}.{a.name}" for a in node.names if _is_module(f"{module}.{a.name}")]
    return subs if len(subs) == len(node.names) else [module, *subs]


def package_imports() -> list[Import]:
    found = []
    for path in package_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        source = module_name(path)
        package = source if path.name == "__init__.py" else source.rsplit(".", 1)[0]
        script_only = {id(n) for guard in ast.walk(tree) if _is_main_guard(guard) for n in ast.walk(guard)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, package):
                    found.append(Import(str(path.relative_to(ROOT)), node.lineno, source, target,
                                        id(node) in script_only))
    return found


def layer(module: str) -> str:
    parts = module.split(".")[1:]
    if parts and (parts[-1] in CLI_FILES or parts[0] in CLI_PACKAGES):
        return "cli"
    if module in PIPELINES:
        return "pipelines"
    if parts and parts[0] in LAYERS:
        return parts[0]
    return "root"


def top_level(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def upward(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        low = "cli" if imp.script_only else layer(imp.source)
        high = layer(imp.target)
        if LAYERS.index(high) > LAYERS.index(low):
            bad.append(f"{imp.file}:{imp.line}: {low} layer imports {imp.target} of the {high} layer")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one node (a self-import is no cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _cycle_report(component: list[str], imports: list[Import], node_of) -> str:
    members = set(component)
    sites = [f"{i.file}:{i.line} ({node_of(i.source)} -> {node_of(i.target)})" for i in imports
             if node_of(i.source) in members and node_of(i.target) in members
             and node_of(i.source) != node_of(i.target)]
    return f"cycle {' <-> '.join(component)}: " + ", ".join(sites)


def _graph(imports: list[Import], node_of) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for imp in imports:
        a, b = node_of(imp.source), node_of(imp.target)
        if a is not None and b is not None and a != b:
            edges.setdefault(a, set()).add(b)
    return edges


def top_level_cycles(imports: list[Import]) -> list[str]:
    # The cli layer sits above everything and is entered only from outside: its modules (and
    # script-only blocks) import whatever they drive, so they take no part in package cycles.
    kept = [i for i in imports if not i.script_only and layer(i.source) != "cli"]
    return [_cycle_report(c, kept, top_level) for c in cycles(_graph(kept, top_level))]


def inner_cycles(imports: list[Import], package: str) -> list[str]:
    prefix = f"{PACKAGE}.{package}"

    def node_of(module: str) -> str | None:
        return module if module == prefix or module.startswith(prefix + ".") else None

    return [_cycle_report(c, imports, node_of) for c in cycles(_graph(imports, node_of))]


def test_the_reader_sees_the_package():
    imports = package_imports()
    sources = {i.source for i in imports}
    assert {"forcelab.models.dit", "forcelab.train.trainer", "forcelab.cli"} <= sources
    assert any(i.target == "forcelab.errors" for i in imports)


def test_imports_only_go_down_the_layers():
    bad = upward(package_imports())
    assert not bad, "imports going up the layer order:\n" + "\n".join(bad)


def test_no_cycle_between_top_level_packages():
    found = top_level_cycles(package_imports())
    assert not found, "\n".join(found)


def test_no_cycle_inside_kernels_models_data():
    imports = package_imports()
    found = [c for package in ACYCLIC_PACKAGES for c in inner_cycles(imports, package)]
    assert not found, "\n".join(found)


def test_the_checks_catch_violations():
    """The checks fail on a made-up upward import and on a made-up cycle."""
    up = Import("kernels/dispatch.py", 1, "forcelab.kernels.dispatch", "forcelab.train.trainer", False)
    assert upward([up]) == ["kernels/dispatch.py:1: kernels layer imports forcelab.train.trainer of the train layer"]
    script = Import("data/preprocess.py", 9, "forcelab.data.preprocess", "forcelab.cli", True)
    assert upward([script]) == []
    loop = [Import("models/a.py", 3, "forcelab.models.a", "forcelab.models.b", False),
            Import("models/b.py", 5, "forcelab.models.b", "forcelab.models.a", False)]
    assert inner_cycles(loop, "models") == [
        "cycle forcelab.models.a <-> forcelab.models.b: models/a.py:3 (forcelab.models.a -> forcelab.models.b), "
        "models/b.py:5 (forcelab.models.b -> forcelab.models.a)"]
    across = [Import("models/a.py", 3, "forcelab.models.a", "forcelab.data.b", False),
              Import("data/b.py", 5, "forcelab.data.b", "forcelab.models.a", False)]
    assert len(top_level_cycles(across)) == 1
