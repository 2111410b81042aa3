"""The package's shape: no import circle among hald_store's modules and no upward import."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hald_store"


def _imports(path: Path) -> set[str]:
    """hald_store modules ``path`` imports (relative or absolute, at any depth), and ``hald_train``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                out.update(n.split(".")[0] for n in names)
            elif node.module and node.module.split(".")[0] in ("hald_store", "hald_train"):
                parts = node.module.split(".")
                out.add(parts[1] if parts[0] == "hald_store" and len(parts) > 1 else parts[0])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] if a.name.startswith("hald_store.") else a.name
                       for a in node.names if a.name.split(".")[0] in ("hald_store", "hald_train"))
    return out


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {p.stem: (_imports(p) & modules) - {p.stem, "__init__"} for p in PACKAGE.glob("*.py")}


def test_no_import_circle_in_hald_store():
    graph, seen, cycles = _graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = "open"
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = "done"

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])
    assert not cycles, f"import circles: {cycles}"


def test_hald_store_never_imports_hald_train():
    upward = sorted(p.name for p in PACKAGE.glob("*.py") if "hald_train" in _imports(p))
    assert not upward, f"hald_store modules importing hald_train: {upward}"


def test_schema_stands_below_rendering_and_the_package_root():
    """The format description imports neither the DALI glue nor the package (its version is ``_version``)."""
    source = (PACKAGE / "schema.py").read_text()
    roots = [n for n in ast.walk(ast.parse(source))
             if isinstance(n, ast.ImportFrom) and ((n.level == 1 and n.module is None) or n.module == "hald_store")]
    assert not roots, "schema.py imports the package root"
    assert not _imports(PACKAGE / "schema.py") & {"render", "stream", "loader"}, "schema.py imports rendering"


def test_replay_and_device_resolution_have_one_home():
    """The recorded batch arrays are named in replay.py only; only devices.py asks torch about CUDA."""
    batch_paths = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "replay.py" and '"batches/' in p.read_text())
    assert not batch_paths, f"modules naming store paths of recorded batch arrays outside replay.py: {batch_paths}"
    cuda = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "devices.py" and "cuda.is_available(" in p.read_text())
    assert not cuda, f"modules resolving CUDA outside devices.py: {cuda}"
