"""The import rules of the three layers (README, Layout), read from the source.

qlm/ (the library) imports neither services/ nor loadgen/; services import no loadgen and
no other service (shared code is in services/common or the library); nothing outside
loadgen/ imports loadgen, and loadgen's modules import each other without cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("ingest", "estimator", "scheduler", "worker")


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def modules(package: str) -> dict[str, set[str]]:
    """``{module name: imported modules}`` of every .py file under ``package``."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = imports_of(path)
    return out


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{module} imports {imported}"
            for module, imported_set in modules(package).items()
            for imported in sorted(imported_set)
            if any(imported == f or imported.startswith(f + ".") for f in forbidden)]


def test_the_library_imports_neither_services_nor_loadgen() -> None:
    assert offenders("qlm", ("services", "loadgen")) == []


def test_services_import_no_loadgen_and_no_other_service() -> None:
    assert offenders("services", ("loadgen",)) == []
    for service in SERVICES:
        others = tuple(f"services.{s}" for s in SERVICES if s != service)
        assert offenders(f"services/{service}", others) == []
    assert offenders("services/common", tuple(f"services.{s}" for s in SERVICES)) == []


def test_loadgen_has_no_import_cycle() -> None:
    graph = {name: {i for i in imported if i.startswith("loadgen")}
             for name, imported in modules("loadgen").items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "cycle: " + " -> ".join((*path, name))
        if name in done:
            return
        for target in graph.get(name, ()):
            visit(target, (*path, name))
        done.add(name)

    for name in graph:
        visit(name, ())
