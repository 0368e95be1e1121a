"""Module boundaries of the vera_ext package: no import cycles (counting imports inside functions too), no private
name imported from another module, one public list in __init__. Reads the sources; imports nothing."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "vera_ext")


def modules():
    """{dotted module name: (path, ast)} for every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                with open(path, encoding="utf-8") as fh:
                    out[name] = (path, ast.parse(fh.read()))
    return out


def relative_imports(name, path, tree):
    """(imported module, imported names) for every relative import in the module, wherever it appears."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:  # from . import ops: the submodule itself
                for alias in node.names:
                    yield f"{target}.{alias.name}", []
            else:
                yield target, [alias.name for alias in node.names]


def test_no_import_cycles():
    mods = modules()
    graph = {name: {t for t, _ in relative_imports(name, *mods[name]) if t in mods and t != name} for name in mods}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(n for n in graph if n != "vera_ext"):  # the package root imports everything it exports
        if name not in state:
            visit(name)


def test_no_private_names_across_modules():
    mods = modules()
    found = []
    for name in mods:
        for target, names in relative_imports(name, *mods[name]):
            found += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and n != "_C"]
            if target.rsplit(".", 1)[-1].startswith("_") and not target.endswith("._C"):
                found.append(f"{name} imports the private module {target}")
    assert not found, found


def test_init_is_one_import_block_and_one_all():
    _, tree = modules()["vera_ext"]
    alls = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AugAssign)) and "__all__" in ast.dump(n)]
    assert len(alls) == 1 and isinstance(alls[0], ast.Assign), "vera_ext/__init__.py: one __all__ assignment"
    kinds = [type(n).__name__ for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    first, last = kinds.index("ImportFrom"), len(kinds) - 1 - kinds[::-1].index("ImportFrom")
    assert all(k == "ImportFrom" for k in kinds[first : last + 1]), f"imports are not one block: {kinds}"
