"""The package's shape: no import cycles, no two modules importing each other, no module over 400 lines.

The import graph counts top-level and function-level imports (a lazy import is still a dependency), resolved
to the package's own modules; importing one's own parent package does not count (a package re-exports its parts).
"""
import ast
from pathlib import Path

import ditexport

PACKAGE = Path(ditexport.__file__).parent
MAX_LINES = 400


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its code."""
    modules = {module_name(root, p): p for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `from .pkg import name` -> pkg
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def long_modules(root: Path, limit: int = MAX_LINES) -> dict[str, int]:
    counts = {module_name(root, p): len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    return {m: n for m, n in counts.items() if n > limit}


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_the_checks_find_a_planted_cycle_and_a_long_module(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from . import b\n")
    (root / "b.py").write_text("def f():\n    from .sub.c import g\n")  # a function-level import counts
    (root / "sub" / "__init__.py").write_text("from .c import g\n")      # a package re-exporting its part
    (root / "sub" / "c.py").write_text("from ..a import x\n" + "y = 1\n" * MAX_LINES)
    (root / "d.py").write_text("import pkg.a\n")
    edges = import_graph(root)
    assert edges["pkg.b"] == {"pkg.sub.c"} and edges["pkg.sub"] == {"pkg.sub.c"} and edges["pkg.d"] == {"pkg.a"}
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert long_modules(root) == {"pkg.sub.c": MAX_LINES + 1}


def test_no_module_is_over_the_limit():
    assert long_modules(PACKAGE) == {}


def mutual_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a in edges for b in edges[a] if a < b and a in edges.get(b, ()))


def test_no_two_modules_import_each_other():
    assert mutual_imports(import_graph(PACKAGE)) == []


def test_a_planted_mutual_import_is_found(tmp_path):
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "e.py").write_text("import pkg.f\n")
    (root / "f.py").write_text("def g():\n    from .e import h\n")
    assert mutual_imports(import_graph(root)) == [("pkg.e", "pkg.f")]


# The layers of DESIGN.md, lowest first: a module imports only from its own layer and those below. (Review finding of
# issue 20: backends/open.py, which runs exports, imported from build.py, which makes them.)
LAYERS = [
    ("ground", ["model", "diffusion", "source", "checkpoint", "diffusers_format", "artifacts", "verification",
                "locking", "errors", "settings", "limits", "precisions", "hashing", "logs", "progress", "threads", "class_names",
                "zoo", "lazy"]),
    ("running", ["pipeline", "sampler", "backends", "images", "blend", "engine.plans", "engine.profile"]),
    ("making", ["building", "validate", "export", "engine", "vae", "bench", "gpu_check", "zoo.digits_train",
                "zoo.digits_eval", "zoo.digits_sweep", "zoo.digits_data"]),
    ("api", ["api", ""]),
    ("adapters", ["cli", "demo_app", "serving", "__main__"]),
]


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of `module` ("" is the package itself)."""
    best, length = None, -1
    for level, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            name = f"ditexport.{prefix}" if prefix else "ditexport"
            below = module.startswith(name + ".") and prefix != ""  # the package itself has no modules below
            if (module == name or below) and len(name) > length:
                best, length = level, len(name)
    assert best is not None, f"{module} is in no layer of the test"
    return best


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a in edges for b in edges[a] if layer_of(b) > layer_of(a))


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph(PACKAGE)) == []


def test_an_upward_import_is_found():
    edges = {"ditexport.backends.open": {"ditexport.building"}, "ditexport.cli": {"ditexport.api"}}
    assert upward_imports(edges) == ["ditexport.backends.open -> ditexport.building"]
