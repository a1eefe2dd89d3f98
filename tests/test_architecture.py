"""The project's import graph: every import counts (top level, `TYPE_CHECKING` and function level). No cycle joins
the project's modules, and the service's folders are layers: a module imports its own layer or those below it,
never one above (`LAYERS`, lowest first; docs/architecture.md draws the same picture)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("service", "vit_artifact", "model_export", "client/vitserve_client")

# The service's layers, lowest first: (name, the modules in it, by dotted prefix).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("service.errors", "service.settings", "service.route_table")),
    ("observability", ("service.obs",)),
    ("core", ("service.core",)),
    ("open inference protocol", ("service.v2",)),
    ("endpoints", ("service.api",)),
    ("transports", ("service.http", "service.grpc_v2")),
    ("processes", ("service.app", "service.procs", "service.__main__")),
]
# What the engine process may import of the service: it owns the models and serves no HTTP.
ENGINE = "service.procs.engine"
NOT_IN_THE_ENGINE = ("service.api", "service.http", "service.grpc_v2", "service.app", "service.__main__")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        base = ROOT / package
        prefix = ROOT / package.rpartition("/")[0] if "/" in package else ROOT
        for path in base.rglob("*.py"):
            name = ".".join(path.relative_to(prefix).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, wherever the import statement stands."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for target in targets:
                while target and target not in known:  # `from package import module`, or a name in a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles among the project's modules: {found}"


def layer(module: str) -> int | None:
    """`module`'s place in `LAYERS`; None for `service` itself (the version) and for other packages."""
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def test_every_service_module_has_a_layer() -> None:
    homeless = [name for name in modules() if name.startswith("service.") and layer(name) is None]
    assert not homeless, f"modules in no layer of LAYERS (a folder of their own, or a place in one): {homeless}"


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [
        f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})"
        for name, targets in import_graph().items()
        if (mine := layer(name)) is not None
        for target in sorted(targets)
        if (theirs := layer(target)) is not None and theirs > mine
    ]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_the_engine_imports_nothing_of_http() -> None:
    graph = import_graph()
    reached, todo = set(), [ENGINE]
    while todo:  # everything the engine's module imports, directly or not
        for target in graph[todo.pop()]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    http = sorted(m for m in reached if m.startswith(NOT_IN_THE_ENGINE))
    assert not http, f"the engine process imports HTTP modules: {http}"
