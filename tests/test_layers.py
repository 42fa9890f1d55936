"""The layout's promise: lower layers never import higher ones, so there are no
import cycles, and the device side (everything below `models`/`exporter`) runs
without torch. Every import counts: inside functions, relative ones, and those
under a module-level `try:` or `if`; and a torch-free module may not reach torch
through another module of ours either."""

import ast
from pathlib import Path

import pytest

import samout_edge

PACKAGE = Path(samout_edge.__file__).parent
# Lowest first. A unit may import units of its own rank or lower, never higher.
LAYERS = [
    {"errors", "progress"},
    {"artifact"},
    {"scans", "lowering", "scan_checks", "profiles", "native"},
    {"models"},
    {"kernels"},
    {"tensorrt"},
    {"runtime"},
    {"exporter"},
    {"bench", "generate", "evaluate", "inspection", "inlining", "doctor", "triton_server"},
    {"serve"},
    {"cli"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# Units the device install (no torch) must be able to import at module level.
TORCH_FREE = {"errors", "progress", "artifact", "native", "scans", "lowering", "scan_checks", "profiles", "tensorrt", "runtime",
              "bench", "generate", "evaluate", "serve", "inspection", "inlining", "doctor", "triton_server", "cli"}
# Modules of torch-free units that import torch at module level, loaded only when torch is asked for.
TORCH_MODULES = {"bench/op.py", "tensorrt/plugin.py"}  # runtime/torch_runner.py registers torch without it
HEAVY = ("torch", "onnxscript", "triton")


def unit_of(path: Path, package: Path = PACKAGE) -> str:
    return path.relative_to(package).parts[0].removesuffix(".py")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """Statements run on import: the module's body, into try/if/with blocks, not into defs or classes."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        found.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            todo += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
            for handler in getattr(node, "handlers", []):
                todo += handler.body
    return found


def imports(path: Path, module_level_only: bool = False, package: Path = PACKAGE) -> set[str]:
    """Absolute names of what ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    nodes = _module_level(tree) if module_level_only else ast.walk(tree)
    here = module_name(path, package).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # a module's relative imports start from its package
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base:
                names.add(base)
                names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def edges(package: Path = PACKAGE) -> set[tuple[str, str, str]]:
    found = set()
    root = package.name
    for path in package.rglob("*.py"):
        if path.name in ("__main__.py",) or path.parent == package and path.name == "__init__.py":
            continue
        src = unit_of(path, package)
        for name in imports(path, package=package):
            parts = name.split(".")
            if parts[0] == root and len(parts) > 1 and parts[1] in RANK:
                found.add((src, parts[1], str(path.relative_to(package))))
    return found


def torch_violations(package: Path = PACKAGE, torch_free: set[str] = TORCH_FREE,
                     torch_modules: set[str] = TORCH_MODULES) -> list[str]:
    """Torch-free modules (every module of a torch-free unit, top-level modules included) that
    import torch at module level, directly or through modules of ours they import at module level."""
    root = package.name
    paths = {module_name(p, package): p for p in package.rglob("*.py") if p.name != "__main__.py"}
    direct = {name: imports(p, module_level_only=True, package=package) for name, p in paths.items()}

    def ours(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    heavy: dict[str, bool] = {}

    def reaches_torch(name: str, seen: set[str]) -> bool:
        if name in heavy:
            return heavy[name]
        seen.add(name)
        hit = any(n.split(".")[0] in HEAVY for n in direct[name])
        for n in direct[name]:
            target = ours(n) if n.startswith(root + ".") else None
            if not hit and target and target not in seen:
                hit = reaches_torch(target, seen)
        heavy[name] = hit
        return hit

    bad = []
    for name, path in paths.items():
        rel = str(path.relative_to(package))
        if path.parent == package and path.name == "__init__.py":
            continue
        if unit_of(path, package) in torch_free and rel not in torch_modules and reaches_torch(name, set()):
            bad.append(rel)
    return sorted(bad)


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
    assert not torch_violations(), "torch at module level, directly or through our modules"


# --------------------------------------------------------------------------- the checker catches what it must


PROBES = {
    # each: files of a fake package `pkg`, and the violation the checker must report
    "a relative import": ({"artifact/__init__.py": "", "artifact/x.py": "from ..runtime import thing\n",
                           "runtime/__init__.py": "thing = 1\n"}, "layers"),
    "a top-level module": ({"generate.py": "import torch\n"}, "torch"),
    "an import under try": ({"runtime/__init__.py": "", "runtime/y.py": "try:\n    import torch\nexcept ImportError:\n"
                                                                          "    torch = None\n"}, "torch"),
    "a torch module of ours": ({"runtime/__init__.py": "", "runtime/torchy.py": "import torch\n",
                                "runtime/z.py": "from pkg.runtime import torchy\n"}, "torch"),
}


@pytest.mark.parametrize("gap", list(PROBES))
def test_probes_fail_the_checks(tmp_path, gap):
    """The four gaps a review found, each shown by a probe the earlier checker let pass."""
    files, kind = PROBES[gap]
    package = tmp_path / "pkg"
    for rel, text in files.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    (package / "__init__.py").write_text("")
    if kind == "layers":
        bad = [(s, d) for s, d, _ in edges(package) if RANK[d] > RANK[s]]
        assert bad == [("artifact", "runtime")]
    else:
        free = {"runtime", "generate"}
        assert torch_violations(package, free, {"runtime/torchy.py"}), gap
