"""The house's structure: the import graph has no circles, and commands are siblings (only the demo,
which tells the whole story, composes other commands). Read from the source with `ast`."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "src" / "glmae"
# the command modules: each imports the layers below it and never another command
COMMANDS = {"pretrain", "finetune", "evaluate", "predict", "export", "plan", "import_weights", "demo"}
COMPOSER = "demo"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules of glmae that `path` imports, at the top level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from glmae.engine import run`
    return {m for m in out if m == "glmae" or m.startswith("glmae.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import circles.
    A package's `__init__` importing its own submodules is not a circle of the house."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def package_edges(edges):
    """Without the edges from a package's __init__ to its own submodules (re-exports)."""
    return {v: {w for w in ws if not w.startswith(v + ".")} for v, ws in edges.items()}


def test_the_import_graph_has_no_circles():
    assert cycles(package_edges(graph())) == []


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_commands_import_no_other_command_but_the_demo_composes_them():
    edges = graph()
    commands = {f"glmae.{c}" for c in COMMANDS} & set(edges)
    assert {"glmae.pretrain", "glmae.finetune", "glmae.evaluate", "glmae.predict", "glmae.export"} <= commands
    for command in commands - {f"glmae.{COMPOSER}"}:
        assert not edges[command] & commands, f"{command} imports {edges[command] & commands}"
    assert {"glmae.pretrain", "glmae.finetune", "glmae.evaluate"} <= edges[f"glmae.{COMPOSER}"]


def test_lower_layers_import_no_command_and_methods_use_only_the_engines_leaf_tools():
    edges = graph()
    commands = {f"glmae.{c}" for c in COMMANDS} | {"glmae.cli"}
    for module, targets in edges.items():
        if module not in commands and module != "glmae.__main__":
            assert not targets & commands, f"{module} imports the command(s) {targets & commands}"
    for module, targets in edges.items():
        if module.startswith(("glmae.models", "glmae.metrics", "glmae.data", "glmae.synth")):
            assert not {t for t in targets if t.startswith(("glmae.methods", "glmae.engine.trainer",
                                                             "glmae.engine.run"))}, module
        if module.startswith("glmae.methods"):
            assert not targets & {"glmae.engine.trainer", "glmae.engine.run"}, module
    # the training loop knows no method
    assert not {t for t in edges["glmae.engine.trainer"] if t.startswith("glmae.methods")}
