"""The library's modules import one way: no import circle, counting the imports made inside
functions (only ``if TYPE_CHECKING:`` blocks are left out), and each concern in its folder."""

import ast
from pathlib import Path

import lorax

PACKAGE = Path(lorax.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The lorax modules ``path`` imports anywhere but under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in tree.body if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from package import module` or `from module import name`
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    """Each module of ``lorax._src`` (packages' ``__init__`` left out) and the others it imports."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = {name for name, p in paths.items() if p.name != "__init__.py" and name.startswith("lorax._src.")}
    return {name: (imports(paths[name], set(paths)) & modules) - {name} for name in modules}


def circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for other in sorted(edges[module]):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state and (found := visit(other)):
                return found
        state[module] = "done"
        stack.pop()
        return None

    return next((found for module in sorted(edges) if module not in state and (found := visit(module))), None)


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    assert len(edges) > 40  # the scan found the library
    assert circle(edges) is None, " -> ".join(circle(edges) or [])


def test_the_circle_finder_finds_a_deferred_import_back():
    edges = graph()
    edges["lorax._src.paths"] = edges["lorax._src.paths"] | {"lorax._src.io.checkpoint"}  # checkpoint needs paths
    found = circle(edges)
    assert found is not None and found[0] == found[-1] and "lorax._src.io.checkpoint" in found


def test_each_concern_lives_in_its_folder():
    edges = graph()
    folders = {"tracing": {"trace", "uses", "table", "tracked", "transform"}, "kinds": {"adapter", "lora", "dora"},
               "bases": {"formats", "quantized", "quantize", "precision"}, "banks": {"verbs", "weighted"},
               "io": {"files", "checkpoint", "records", "peft", "llamacpp", "bank_files", "verbs"}}
    for folder, names in folders.items():
        assert {f"lorax._src.{folder}.{name}" for name in names} <= set(edges), folder
    # the file formats are read and written under io/ alone
    writers = {m for m, imported in edges.items() if "lorax._src.io.files" in imported}
    assert writers and all(m.startswith("lorax._src.io.") for m in writers), sorted(writers)
