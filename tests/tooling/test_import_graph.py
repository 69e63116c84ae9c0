"""The layers of the README hold: no package imports one above it, no cycles between packages or modules.

Read from the source with `ast` (every import counts: module level, inside functions, and under
``TYPE_CHECKING``), so a lazy import cannot hide a dependency. The layers, lowest first:

    ioc (the kernel) < alerts < streams < simulators, reports < api
        < entrypoints.embedded < bench < entrypoints (the ``ioc`` command, the dev supervisor)

A module may import its own unit and any unit of a lower layer; units of one layer do not import
each other. A unit is a package, or the subpackage named here (the embedded services sit below the
benchmark harness, which the ``ioc`` command runs).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Unit → layer (lower imports nothing higher). Units on one layer are independent.
LAYERS: dict[str, int] = {
    "ioc": 0,
    "alerts": 1,
    "streams": 2,
    "simulators": 3,
    "reports": 3,
    "api": 4,
    "entrypoints.embedded": 5,
    "bench": 6,
    "entrypoints": 7,
}
PACKAGES = sorted({unit.split(".")[0] for unit in LAYERS})


def unit_of(module: str) -> str:
    """The unit of LAYERS a module belongs to (the longest that names it or a package above it)."""
    return max((u for u in LAYERS if module == u or module.startswith(u + ".")), key=len)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """The project modules (or packages) ``module`` imports, resolved to full dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                keep = len(base) - node.level + (1 if is_package else 0)
                prefix = ".".join(base[:keep])
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            found.add(target)
            # ``from pkg import module`` names a module too
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def project_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the project modules it imports (names that are not modules, e.g. a class, dropped)."""
    sources: dict[str, tuple[str, bool]] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else ():
            sources[module_name(path, root)] = (path.read_text(encoding="utf-8"), path.name == "__init__.py")
    graph: dict[str, set[str]] = {}
    for module, (source, is_package) in sources.items():
        graph[module] = {name for name in imports_of(source, module, is_package) if name in sources and name != module}
    return graph


def layer_violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        own = unit_of(module)
        for target in sorted(targets):
            other = unit_of(target)
            if other != own and LAYERS[other] >= LAYERS[own]:
                found.append(f"{module} imports {target}: {other} is not below {own}")
    return found


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_graph(graph: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        own = unit_of(module)
        packages.setdefault(own, set()).update(unit_of(t) for t in targets if unit_of(t) != own)
    return packages


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return project_graph()


def test_no_package_imports_one_above_it(graph: dict[str, set[str]]) -> None:
    found = layer_violations(graph)
    assert not found, "imports against the layers (README, 'The layers'):\n" + "\n".join(found)


def test_no_cycle_between_packages(graph: dict[str, set[str]]) -> None:
    found = cycles(package_graph(graph))
    assert not found, "packages importing each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_cycle_between_modules(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    assert not found, "modules importing each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checks_find_a_cycle_and_an_upward_import() -> None:
    """The checks themselves can fail: a made-up graph with both faults."""
    made_up = {"ioc.settings": {"api.app"}, "api.app": {"api.ws"}, "api.ws": {"api.app", "ioc.settings"}}
    assert layer_violations(made_up) == ["ioc.settings imports api.app: api is not below ioc"]
    assert cycles(made_up) == [["api.app", "api.ws", "ioc.settings"]]
    assert cycles(package_graph(made_up)) == [["api", "ioc"]]


def test_relative_and_lazy_imports_count() -> None:
    source = "from . import b\ndef f():\n    from ..x import y\nif TYPE_CHECKING:\n    import api.app\n"
    assert imports_of(source, "streams.sub.a") == {"streams.sub", "streams.sub.b", "streams.x", "streams.x.y", "api.app"}
