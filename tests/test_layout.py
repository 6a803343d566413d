"""The package's shape, read from its source with ``ast``: no import circles inside trainpatterns,
only ``trainpatterns._kernels`` imports the native module, and modules stay small.

Every import counts: function-local ones (a local import that closes a circle is still a circle)
and those under ``if TYPE_CHECKING:`` (a module that needs another's types to describe itself is
tied to it; a narrow interface of its own unties them).
"""
from __future__ import annotations

import ast
from pathlib import Path

import trainpatterns

PACKAGE_DIR = Path(trainpatterns.__file__).resolve().parent
REPO = Path(__file__).resolve().parent.parent
MAX_PY_LINES = 450
MAX_CPP_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict:
    """{dotted module name: path} for every .py file of the package."""
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


NATIVE = "trainpatterns._C"


def imports(module: str, path: Path) -> list:
    """What ``module`` imports, as (source, names) pairs: ``import a.b`` is ("a.b", []),
    ``from X import y, z`` is (X, ["y", "z"]) with relative sources made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.append((source, [alias.name for alias in node.names]))
    return found


def import_edges(module: str, path: Path, known: set) -> set:
    """The modules of ``known`` (plus the native module) that ``module`` depends on: ``from X import
    y`` depends on the module X.y when there is one, else on X itself (y is a name X defines)."""
    edges = set()
    for source, names in imports(module, path):
        targets = {f"{source}.{n}" for n in names if f"{source}.{n}" in known or f"{source}.{n}" == NATIVE}
        if not names or len(targets) < len(names):
            targets.add(source)
        edges.update(t for t in targets if (t in known or t == NATIVE) and t != module)
    return edges


def import_graph(modules: dict) -> dict:
    """{module: set of package modules it imports}."""
    known = set(modules)
    return {mod: import_edges(mod, path, known) - {NATIVE} for mod, path in modules.items()}


def find_cycle(graph: dict):
    """One import circle as a list of modules (first == last), or None."""
    state: dict = {}

    def visit(node, trail):
        state[node] = "open"
        trail.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, trail)
                if found:
                    return found
        trail.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [])
            if found:
                return found
    return None


def test_the_checker_sees_circles_through_local_and_type_checking_imports(tmp_path):
    (tmp_path / "a.py").write_text("from .b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import g\n")
    known = {"pkg.a", "pkg.b", "pkg.c"}
    graph = {f"pkg.{p.stem}": import_edges(f"pkg.{p.stem}", p, known) for p in tmp_path.glob("*.py")}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert find_cycle({"pkg.a": {"pkg.b"}, "pkg.b": set()}) is None
    (tmp_path / "d.py").write_text("import torch._C\nfrom trainpatterns import _C, _kernels\n")
    (tmp_path / "e.py").write_text("import torch._C\nfrom trainpatterns import _kernels\n")
    assert NATIVE in import_edges("d", tmp_path / "d.py", set())
    assert NATIVE not in import_edges("e", tmp_path / "e.py", set())


def test_no_import_circle_inside_the_package():
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_only_kernels_imports_the_native_module():
    offenders = []
    for mod, path in package_modules().items():
        if mod == "trainpatterns._kernels" or mod.startswith("trainpatterns._kernels."):
            continue
        if NATIVE in import_edges(mod, path, set(package_modules())):
            offenders.append(mod)
    for folder in ("bench", "tests", "examples"):
        for path in sorted((REPO / folder).glob("*.py")):
            if path.name == Path(__file__).name:
                continue
            if NATIVE in import_edges(path.stem, path, set()):
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"only trainpatterns._kernels may import trainpatterns._C: {sorted(set(offenders))}"


def test_modules_stay_small():
    big = [f"{p.relative_to(REPO)}: {n} lines" for p in sorted(PACKAGE_DIR.rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > MAX_PY_LINES]
    csrc = REPO / "csrc"
    if csrc.is_dir():  # a source checkout (an installed package has no csrc/)
        big += [f"{p.relative_to(REPO)}: {n} lines" for p in sorted(csrc.rglob("*"))
                if p.suffix in (".cpp", ".cu", ".cuh", ".h") and (n := len(p.read_text().splitlines())) > MAX_CPP_LINES]
    assert not big, f"Python modules over {MAX_PY_LINES} lines or C++ files over {MAX_CPP_LINES}: {big}"


def test_every_module_opens_with_a_docblock():
    missing = [mod for mod, path in package_modules().items() if ast.get_docstring(ast.parse(path.read_text())) is None]
    assert not missing, f"modules without a docblock: {missing}"
