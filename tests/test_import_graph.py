"""The package's import graph (every import, at module level or inside a function) has no cycle, the
sub-packages import only their own layer and the layers below it (docs/design.md, "Layers"), and the
kernels import nothing else of the package (they stand alone, like Liger's)."""

import ast
from pathlib import Path

import fdiv_align

ROOT = Path(fdiv_align.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):  # a submodule importing its own package: no edge
                    graph[mod].add(t)
    return graph


def test_no_import_cycle():
    graph = import_graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_kernels_import_nothing_else_of_the_package():
    graph = import_graph()
    outside = {m: sorted(t for t in deps if not t.startswith("fdiv_align.kernels"))
               for m, deps in graph.items() if m.startswith("fdiv_align.kernels")}
    assert not any(outside.values()), outside


#: bottom to top; a module may import its own layer and the layers below, never one above
LAYERS = [
    ("fdiv_align.kernels", "fdiv_align.config", "fdiv_align.files", "fdiv_align.registry", "fdiv_align.extras"),
    ("fdiv_align.objectives",),
    ("fdiv_align.lm",),
    ("fdiv_align.targets",),
    ("fdiv_align.training",),
    ("fdiv_align.preferences",),
    ("fdiv_align.testing", "fdiv_align.integrations", "fdiv_align.report", "fdiv_align.cli", "fdiv_align.__main__",
     "fdiv_align"),
]


def layer_of(module: str) -> int:
    """The layer of ``module``: the one whose longest listed prefix it falls under."""
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/design.md)")
    return best[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) → {t} (layer {layer_of(t)})"
                  for m, deps in graph.items() for t in deps if layer_of(t) > layer_of(m))


def test_every_import_goes_down_the_layers():
    upward = upward_imports(import_graph())
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_objectives_stand_on_their_own():
    graph = import_graph()
    outside = {m: sorted(t for t in deps if not t.startswith(("fdiv_align.objectives", "fdiv_align.registry")))
               for m, deps in graph.items() if m.startswith("fdiv_align.objectives")}
    assert not any(outside.values()), outside


def test_the_layer_check_reports_an_upward_import():
    graph = {"fdiv_align.lm.policy": {"fdiv_align.targets.target", "fdiv_align.lm.models"},
             "fdiv_align.training.trainer": {"fdiv_align.lm.policy"}}
    assert upward_imports(graph) == ["fdiv_align.lm.policy (layer 2) → fdiv_align.targets.target (layer 3)"]
