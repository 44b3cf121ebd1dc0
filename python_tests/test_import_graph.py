"""The package's imports run one way (docs/design.md §11.1), read from the source with ``ast``:

    CLI and integrations -> engine and distributed -> ops -> backend and leaf helpers

- no import circle between the package's modules, counting the imports inside functions
  (the lazy ones are how a circle hides);
- no module imports a layer above its own, nor the package face (``vreason_kernels``);
- in each op folder, the backends (``naive``, ``cpp``, ``triton_*``) do not import one
  another across kinds, and only the dispatcher ``op.py`` picks a backend module.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "vreason_kernels"
PACKAGE = "vreason_kernels"

# Lowest first; a module is in the layer of the longest prefix that names it.
LAYERS = {
    "leaf": ["_alloc", "_checks", "_collectives", "_extension", "_version", "backend", "loading", "video"],
    "ops": ["ops"],
    "engine": ["engine", "distributed", "reference"],
    "cli": ["integrations", "cli", "__main__", "_transformers_hook"],
}
RANK = {name: rank for rank, name in enumerate(LAYERS)}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str):
    rest = module[len(PACKAGE) + 1:]
    matches = [(len(prefix), layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
               if rest == prefix or rest.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def _resolve(name: str):
    """The package module an import names (a ``from x import y`` may name module x.y)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set:
    """Every package module ``module`` imports, at any depth of its code."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name)
                if target and target != module:
                    found.add(target)
    # "from pkg import sub" names pkg.sub; drop pkg itself when a submodule of it was meant.
    return {t for t in found if not any(o != t and o.startswith(t + ".") for o in found) or t == PACKAGE}


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if m != PACKAGE and _layer(m) is None]
    assert not unplaced, f"place these modules in a layer of LAYERS: {unplaced}"


def test_no_import_circle():
    state, stack, circles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if target == PACKAGE:
                continue  # the face imports everything; importing it is its own test
            if state.get(target) == "open":
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_no_import_runs_up_or_to_the_package_face(layer):
    bad = []
    for module, targets in GRAPH.items():
        if module == PACKAGE or _layer(module) != layer:
            continue
        for target in targets:
            if target == PACKAGE:
                bad.append(f"{module} imports the package face {PACKAGE}")
            elif RANK[_layer(target)] > RANK[layer]:
                bad.append(f"{module} ({layer}) imports {target} ({_layer(target)})")
    assert not bad, "\n".join(sorted(bad))


def _backend_kind(module: str):
    leaf = module.rpartition(".")[2]
    if leaf in ("naive", "cpp"):
        return leaf
    return "triton" if leaf.startswith("triton_") else None


OP_PACKAGES = sorted(m for m in MODULES if m.count(".") == 2 and m.startswith(f"{PACKAGE}.ops.")
                     and MODULES[m].name == "__init__.py")


@pytest.mark.parametrize("op", OP_PACKAGES)
def test_backends_do_not_know_each_other(op):
    bad = []
    for module in (m for m in MODULES if m.startswith(op + ".")):
        kind = _backend_kind(module)
        for target in GRAPH[module]:
            other = _backend_kind(target) if target.startswith(op + ".") else None
            if kind and other and other != kind:
                bad.append(f"{module} ({kind}) imports {target} ({other})")
            if target == op:
                bad.append(f"{module} imports its op's package face {op}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("op", OP_PACKAGES)
def test_only_the_dispatcher_picks_a_backend(op):
    pickers = [m for m in MODULES if m.startswith(op + ".") and "backend_module(" in MODULES[m].read_text()]
    assert pickers in ([], [f"{op}.op"]), pickers


def test_distributed_uses_only_the_public_names_of_an_op_package():
    """``distributed/`` builds on what an op's package exports, never on its private names
    or its modules."""
    bad = []
    for module in (m for m in MODULES if m.startswith(f"{PACKAGE}.distributed")):
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{PACKAGE}.ops"):
                if node.module not in OP_PACKAGES:
                    bad.append(f"{module} imports from {node.module}, not an op package")
                bad += [f"{module} imports the private {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_")]
            elif isinstance(node, ast.Import):
                bad += [f"{module} imports {a.name}" for a in node.names if a.name.startswith(f"{PACKAGE}.ops.")]
    assert not bad, "\n".join(bad)
