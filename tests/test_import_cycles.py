"""vlp's internal imports form no cycle: every import is counted, the module-level ones, those inside
functions (deferred imports that only hide a circle) and those under ``if TYPE_CHECKING:``.

A module imports a package's ``__init__`` as well when it imports a submodule of it, since Python runs the
package first; ``from vlp.pkg import name`` counts as an import of ``vlp.pkg.name`` when that is a module,
else of ``vlp.pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "vlp"

# Edges allowed to close a cycle, by (importer, imported), each with its reason.
ALLOWED: dict[tuple[str, str], str] = {
    ("vlp.models.vlp_model", "vlp.models.factory"):
        "VLPModel.from_config is the public front of build_model, which constructs a VLPModel; the import "
        "runs at call time, when both modules are loaded",
    ("vlp.models.vlp_model", "vlp.models.persist"):
        "VLPModel.from_pretrained / save_pretrained are the public front of the checkpoint code, which "
        "rebuilds a VLPModel through the factory; the import runs at call time",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in ROOT.rglob("*.py")}


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    if not level:
        return module
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    found: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, name, path.name == "__init__.py")
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            parts = target.split(".")
            # importing vlp.a.b runs vlp.a first (the root package vlp itself is left out: it only re-exports)
            for end in range(2, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if prefix in known and prefix != name:
                    found.add(prefix)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    for name in graph:  # a package's __init__ importing its own submodules is how packages are built
        graph[name] = {target for target in graph[name] if not (name != "vlp" and target.startswith(name + "."))}
    return {name: {t for t in targets if (name, t) not in ALLOWED} for name, targets in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_deferred_and_type_checking_imports() -> None:
    graph = _graph()
    assert "vlp.collectives" in graph["vlp.losses.contrastive"]
    assert "vlp.models.vqa_model" in graph["vlp.eval.vqa"]  # under TYPE_CHECKING only


def test_vlp_has_no_import_cycle() -> None:
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_allowed_edges_still_exist() -> None:
    modules = _modules()
    for (importer, imported), reason in ALLOWED.items():
        assert reason and imported in _imports(importer, modules[importer], set(modules)), (importer, imported)
