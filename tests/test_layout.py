"""The package layout the guide asks for, checked on the source: data flows one way, the bottom of the
stack imports nothing above it, and no module imports one that (through others) imports it.

Imports are read with `ast` from every module of `gateway/`. "At import time" means a module-level import
(also inside a module-level `try`/`if`), not one under `if TYPE_CHECKING:` and not one inside a function
(those run later, and are how a module may use something above it lazily: the CLI does).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gateway"

# What each package may import from the gateway, anywhere in it (also lazily, also for types).
ALLOWED = {
    "gateway.admission": {"gateway.admission", "gateway.errors"},
    "gateway.store": {"gateway.store", "gateway.errors", "gateway.settings"},
}
# What a package must never import, anywhere in it: the layers above it.
FORBIDDEN = {
    "gateway.usage": {"gateway.pipeline", "gateway.api", "gateway.admin", "gateway.cli", "gateway.snapshot"},
    "gateway.tenancy": {"gateway.pipeline", "gateway.api", "gateway.admin", "gateway.cli", "gateway.usage"},
    "gateway.policy": {"gateway.pipeline", "gateway.api", "gateway.admin", "gateway.cli", "gateway.usage"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = module.split(".")
        package = base if (PACKAGE / Path(*base[1:]) / "__init__.py").exists() else base[:-1]
        prefix = ".".join(package[: len(package) - node.level + 1])
        target = f"{prefix}.{node.module}" if node.module else prefix
    else:
        target = node.module or ""
    # Each imported name, as a module where it is one ("from gateway.cli import config" imports
    # gateway.cli.config; the parent package being imported first is how Python imports any submodule).
    return [f"{target}.{alias.name}" for alias in node.names]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, tree: ast.Module) -> tuple[set[str], set[str]]:
    """(imported at import time, imported anywhere) as dotted names of gateway modules."""
    at_import: set[str] = set()
    anywhere: set[str] = set()

    def visit(nodes: list[ast.stmt], top: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else _resolve(module, node))
                names = [n for n in names if n == "gateway" or n.startswith("gateway.")]
                anywhere.update(names)
                if top:
                    at_import.update(names)
            elif isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.body, False)
                visit(node.orelse, top)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, False)  # runs when called, not when imported
            elif isinstance(node, ast.Try):
                visit(node.body, top)
                for handler in node.handlers:
                    visit(handler.body, top)
                visit(node.orelse, top)
                visit(node.finalbody, top)
            else:  # class bodies, if, with, for, while: run at import time
                for field in ("body", "orelse"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        visit([c for c in children if isinstance(c, ast.stmt)], top)

    visit(tree.body, True)
    return at_import, anywhere


def _graph() -> dict[str, tuple[set[str], set[str]]]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts and path.parent.name == "versions":
            continue
        name = _module_name(path)
        modules[name] = _imports(name, ast.parse(path.read_text(), str(path)))
    known = set(modules)

    def real(names: set[str]) -> set[str]:  # "gateway.x.y.Name" -> the module "gateway.x.y"
        out = set()
        for name in names:
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known:
                out.add(name)
        return out

    return {name: (real(at), real(anywhere)) for name, (at, anywhere) in modules.items()}


GRAPH = _graph()


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_the_bottom_of_the_stack_imports_nothing_above_it(package: str) -> None:
    for module, (_, anywhere) in GRAPH.items():
        if not _within(module, package):
            continue
        above = {name for name in anywhere if name != "gateway" and not any(_within(name, ok) for ok in ALLOWED[package])}
        assert not above, f"{module} imports {sorted(above)}; {package} may import only {sorted(ALLOWED[package])}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_reaches_back_up_the_request_path(package: str) -> None:
    for module, (_, anywhere) in GRAPH.items():
        if _within(module, package):
            bad = {name for name in anywhere if any(_within(name, f) for f in FORBIDDEN[package])}
            assert not bad, f"{module} imports {sorted(bad)}, which sit above {package}"


def test_no_module_imports_one_that_imports_it() -> None:
    """No cycle among the modules' import-time imports (a package's __init__ counts as its module)."""
    edges = {module: {n for n in at if n != module} for module, (at, _) in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_old_homes_of_admission_are_gone() -> None:
    for old in ("gateway.tenancy.ratelimit", "gateway.tenancy.ratelimit_redis", "gateway.tenancy.holds",
                "gateway.usage.quota", "gateway.usage.quota_redis", "gateway.usage.counters"):
        assert old not in GRAPH, f"{old} still exists"


@pytest.mark.parametrize("package", ["gateway.admission", "gateway.store", "gateway.usage", "gateway.tenancy"])
def test_each_package_imports_alone(package: str) -> None:
    """Imported first, in a fresh interpreter, each package (and its modules) loads without the others
    having been imported before it: no hidden dependency on import order."""
    modules = sorted(m for m in GRAPH if _within(m, package) and ".migrations" not in m)  # Alembic runs those
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_checker_sees_imports() -> None:
    """The graph is not empty by mistake: known edges are in it."""
    assert "gateway.admission.ratelimit" in GRAPH["gateway.admission.quota"][0]
    assert "gateway.store.ledger" in GRAPH["gateway.usage.record"][0]
    assert importlib.import_module("gateway.admission.quota_reseed")


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_two_packages_import_each_other() -> None:
    """Between packages (gateway.<name>), imports at import time go one way: before this layout,
    tenancy and usage imported each other (rate limits in one, quotas in the other)."""
    edges: dict[str, set[str]] = {}
    for module, (at, _) in GRAPH.items():
        for name in at:
            if _package(name) != _package(module) and name != "gateway":
                edges.setdefault(_package(module), set()).add(_package(name))
    for package, targets in edges.items():
        for target in targets:
            assert package not in _reachable(edges, target), f"{package} and {target} import each other"


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen
