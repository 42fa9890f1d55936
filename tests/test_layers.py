"""The layout's promise: lower layers never import higher ones, so there are no
import cycles, and the device side (everything below `models`/`exporter`) runs
without torch. Every import counts, including those inside functions."""

import ast
from pathlib import Path

import samout_edge

PACKAGE = Path(samout_edge.__file__).parent
# Lowest first. A unit may import units of its own rank or lower, never higher.
LAYERS = [
    {"errors", "progress"},
    {"artifact"},
    {"lowering", "profiles"},
    {"models"},
    {"kernels"},
    {"tensorrt"},
    {"runtime"},
    {"exporter"},
    {"bench", "generate", "evaluate", "inspection", "inlining", "doctor", "triton_repo"},
    {"serve"},
    {"cli"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# Units the device install (no torch) must be able to import at module level.
TORCH_FREE = {"errors", "progress", "artifact", "lowering", "profiles", "tensorrt", "runtime", "bench", "generate", "evaluate", "serve",
              "inspection", "inlining", "doctor", "triton_repo", "cli"}
TORCH_MODULES = {"runtime/torch_runner.py", "bench/op.py", "tensorrt/plugin.py"}  # loaded only when torch is asked for


def unit_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imports(path: Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def edges() -> set[tuple[str, str, str]]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("__main__.py",) or path.parent == PACKAGE and path.name == "__init__.py":
            continue
        src = unit_of(path)
        for name in imports(path):
            parts = name.split(".")
            if parts[0] == "samout_edge" and len(parts) > 1 and parts[1] in RANK:
                found.add((src, parts[1], str(path.relative_to(PACKAGE))))
    return found


def test_every_unit_has_a_layer():
    units = {unit_of(p) for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name not in ("__init__.py", "__main__.py")}
    assert units <= set(RANK), f"give these a layer in tests/test_layers.py: {units - set(RANK)}"


def test_lower_layers_never_import_higher_ones():
    bad = sorted(f"{where}: {src} imports {dst}" for src, dst, where in edges() if RANK[dst] > RANK[src])
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_units():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges():
        if src != dst:
            graph.setdefault(src, set()).add(dst)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(u for u in graph if reaches(u, u, set()))
    assert not cycles, f"units in an import cycle: {cycles}"


def test_device_side_imports_no_torch_at_module_level():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if path.parent != PACKAGE and unit_of(path) in TORCH_FREE and rel not in TORCH_MODULES:
            heavy = {n for n in imports(path, module_level_only=True) if n.split(".")[0] in ("torch", "onnxscript", "triton")}
            heavy |= {n for n in imports(path, module_level_only=True) if n.startswith(("samout_edge.models", "samout_edge.exporter", "samout_edge.kernels"))}
            if heavy:
                bad.append(f"{rel}: {sorted(heavy)}")
    assert not bad, "\n".join(bad)
