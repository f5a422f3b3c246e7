"""The package's layers, read from its source: no import circles, imports only downward.

Every module's ``import`` statements are parsed with :mod:`ast`, wherever they
stand: at module level, inside functions (lazy imports) and under
``if TYPE_CHECKING:``. Importing ``a.b.c`` also runs the packages ``a`` and
``a.b``, so those count as imported too. Imports by a string (the storage
registry's ``importlib.import_module``) are not statements and are not seen:
the registry is how upper layers reach a backend.

Lazy and typing-only imports count, for circles as for direction: they only
hide a circle from the interpreter (until the function runs), not from the
reader nor from the next change; the tape <-> sideband circle was a lazy one.
A separate test holds the imports that run at import time to no circle at all,
so a failure says which kind of circle came back.

Layers, lowest first: core <- db <- storage <- gateway <- bulk <- identity <- web <- cli;
the client sits beside them and imports only core. ``pacifica_like.wsgi`` and
``pacifica_like.__main__`` are entry points above everything.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pacifica_like
from pacifica_like.storage import registry

PACKAGE = Path(pacifica_like.__file__).parent
#: The server's layers, lowest first: each may import itself and the ones before it.
SERVER_LAYERS = ("core", "db", "storage", "gateway", "bulk", "identity", "web", "cli")
#: What each layer may import.
ALLOWED: dict[str, frozenset[str]] = {
    **{layer: frozenset(SERVER_LAYERS[: i + 1]) for i, layer in enumerate(SERVER_LAYERS)},
    "client": frozenset(("core", "client")),
    "entry": frozenset((*SERVER_LAYERS, "client", "entry")),
}
# The command line carries ``pacifica-like client``, so cli may use the client too.
ALLOWED["cli"] = ALLOWED["cli"] | {"client"}
#: Storage backends, by the module or package under pacifica_like.storage the registry names for each:
#: the modules of one may not import another's.
BACKENDS = frozenset(target.split(":")[0].split(".")[2] for target in registry.REGISTRY.values())
#: Third-party distributions the client may import (besides the stdlib and pacifica_like.core).
CLIENT_THIRD_PARTY = frozenset(("requests", "urllib3", "tqdm"))


@dataclass(frozen=True)
class Import:
    """One module naming another of the package in an import statement."""

    source: str
    target: str
    line: int
    lazy: bool  # inside a function: runs when the function is called
    typing_only: bool  # under ``if TYPE_CHECKING:``: never runs
    parent: bool = False  # a package above the named module, run by importing it

    def __str__(self) -> str:
        how = " (lazy)" if self.lazy else " (TYPE_CHECKING)" if self.typing_only else ""
        return f"{self.source}:{self.line} imports {self.target}{how}"


def package_modules() -> dict[str, Path]:
    """Return every module of the package by dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = package_modules()


def _known(name: str) -> str | None:
    """Return the package module ``name`` loads: itself, or the package an attribute is taken from."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _with_parents(name: str) -> Iterator[str]:
    """Yield a module and each package above it (importing it runs them all)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        yield ".".join(parts[:end])


def _imported_names(node: ast.Import | ast.ImportFrom, package: str) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        module = ".".join([*base, node.module] if node.module else base)
    else:
        module = node.module or ""
    for alias in node.names:
        # ``from pkg import mod`` imports the submodule; ``from mod import name`` the module.
        yield f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module


def parse_imports(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Return the package modules that ``module``'s ``source`` imports, wherever the statement stands."""
    package = module if is_package else module.rpartition(".")[0]
    found: dict[Import, None] = {}

    def visit(node: ast.AST, lazy: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            child_typing = typing_only or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            )
            if isinstance(child, ast.Import | ast.ImportFrom):
                for name in _imported_names(child, package):
                    target = _known(name)
                    for loaded in _with_parents(target) if target else ():
                        # A module's own packages are loaded before it: no edge back to them.
                        if loaded != module and not module.startswith(loaded + "."):
                            edge = Import(module, loaded, child.lineno, lazy, typing_only, loaded != target)
                            found[edge] = None
            visit(child, child_lazy, child_typing)

    visit(ast.parse(source), False, False)
    return list(found)


def imports_of(module: str) -> list[Import]:
    """Return every import of a package module that ``module``'s source makes."""
    path = MODULES[module]
    return parse_imports(path.read_text(), module, path.name == "__init__.py")


ALL_IMPORTS = [found for module in MODULES for found in imports_of(module)]


def layer_of(module: str) -> str:
    """Return the layer a module belongs to (the root package is a stdlib-only leaf, like core)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    if parts[1] in ("wsgi", "__main__"):
        return "entry"
    return parts[1]


def backend_of(module: str) -> str | None:
    """Return the storage backend a module is part of, or None for shared storage modules."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "storage" and parts[2] in BACKENDS:
        return parts[2]
    return None


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Return the groups of modules that import one another in a circle (Tarjan's components)."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for found in imports:
        graph[found.source].add(found.target)
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for target in graph[module]:
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in graph:
        if module not in order:
            visit(module)
    return cycles


def describe(cycle: list[str], imports: list[Import]) -> str:
    members = set(cycle)
    edges = [str(i) for i in imports if i.source in members and i.target in members and not i.parent]
    return " | ".join(sorted(set(edges)))


# -- the parser itself --------------------------------------------------------------------------------


def test_the_parser_sees_every_form_of_import():
    """The scan must see each form of import, or the layer tests below could pass by missing them."""
    source = """
from __future__ import annotations
import os
from typing import TYPE_CHECKING
import pacifica_like.core.ids
from pacifica_like.core import httpfields
from pacifica_like.core.errors import ArchiveError, InvalidRequest
from ..web import app
from . import registry
if TYPE_CHECKING:
    from pacifica_like.bulk.store import BulkStore
def later():
    from pacifica_like.gateway.audit import run_audit
"""
    found = parse_imports(source, "pacifica_like.storage.example")
    seen = {(i.target, i.lazy, i.typing_only) for i in found}
    assert seen == {
        ("pacifica_like.core.ids", False, False),
        ("pacifica_like.core", False, False),
        ("pacifica_like.core.httpfields", False, False),
        ("pacifica_like.core.errors", False, False),
        ("pacifica_like.web.app", False, False),
        ("pacifica_like.web", False, False),
        ("pacifica_like.storage.registry", False, False),
        ("pacifica_like.bulk.store", False, True),
        ("pacifica_like.bulk", False, True),
        ("pacifica_like.gateway.audit", True, False),
        ("pacifica_like.gateway", True, False),
    }
    assert len(ALL_IMPORTS) > 200, "every module of the package is scanned"


def test_every_module_belongs_to_a_known_layer():
    unknown = sorted(m for m in MODULES if layer_of(m) not in ALLOWED)
    assert not unknown, f"modules outside the layers {sorted(ALLOWED)}: {unknown}"


# -- circles --------------------------------------------------------------------------------------------


def test_no_import_circles_among_imports_that_run_at_import_time():
    eager = [i for i in ALL_IMPORTS if not i.lazy and not i.typing_only]
    cycles = import_cycles(eager)
    assert not cycles, "\n".join(describe(c, eager) for c in cycles)


def test_no_import_circles_counting_lazy_and_typing_only_imports():
    cycles = import_cycles(ALL_IMPORTS)
    assert not cycles, "\n".join(describe(c, ALL_IMPORTS) for c in cycles)


# -- direction ----------------------------------------------------------------------------------------


def test_layers_import_only_themselves_and_the_layers_below():
    upward = [
        f"{layer_of(i.source)} -> {layer_of(i.target)}: {i}"
        for i in ALL_IMPORTS
        if layer_of(i.target) not in ALLOWED[layer_of(i.source)]
    ]
    assert not upward, "\n".join(upward)


def test_no_storage_backend_imports_another_backend():
    assert {"posix", "memory", "tape", "sideband"} <= BACKENDS
    crossing = [
        str(i)
        for i in ALL_IMPORTS
        if backend_of(i.source)
        and backend_of(i.target) != backend_of(i.source)
        and backend_of(i.target)
        and not i.parent
    ]
    assert not crossing, "\n".join(crossing)


def _third_party_imports(module: str) -> set[str]:
    """Return the top-level names of modules outside the package and the stdlib that ``module`` imports."""
    names = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("pacifica_like", "__future__")}


def test_core_uses_the_stdlib_only_and_the_client_only_requests():
    outside = {m: _third_party_imports(m) for m in MODULES if layer_of(m) == "core"}
    assert not {m: names for m, names in outside.items() if names}
    client = {m: _third_party_imports(m) - CLIENT_THIRD_PARTY for m in MODULES if layer_of(m) == "client"}
    assert not {m: names for m, names in client.items() if names}


# -- what importing the client loads ------------------------------------------------------------------


@pytest.mark.parametrize("module", ["pacifica_like.client", "pacifica_like.client.futures"])
def test_importing_the_client_loads_no_server_layer_nor_its_libraries(module: str):
    probe = f"import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(done.stdout))
    assert module in loaded  # the probe did import it
    server = (
        "cherrypy",
        "peewee",
        "playhouse",
        "prometheus_client",
        "webob",
        "psycopg",
        "pymysql",
        "MySQLdb",
    )
    heavy = sorted(name for name in loaded if name.split(".")[0] in server)
    assert not heavy, f"importing {module} loads {heavy}"
    ours = sorted(
        name
        for name in loaded
        if name.startswith("pacifica_like.") and layer_of(name) not in ("core", "client")
    )
    assert not ours, f"importing {module} loads {ours}"
