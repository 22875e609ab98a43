"""The layout's rules, checked on the source: imports run pipeline -> actors -> engine -> kernels and never back,
training imports only the engine, the kernels and the synthetic scenes (and nothing imports training), the engine
and its tests import no Ray, no module-level import circle exists even counting imports inside functions, no
file runs past 300 lines but those allowed below, and no test reaches into benchmarks through sys.path."""
from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

LAYERS = ["pipeline", "actors", "engine", "kernels"]  # each may import only the ones after it
# beside the layers: what each other package may import of ours (scenes: the synthetic corpus, PIL only)
SIDE = {"training": {"engine", "kernels", "scenes"}, "scenes": set()}
ALLOWED = {layer: set(LAYERS[i + 1:]) | ({"scenes"} if layer == "pipeline" else set())
           for i, layer in enumerate(LAYERS)} | SIDE
THIRD_PARTY_BANNED = {"engine": {"ray"}, "kernels": {"ray"}, "training": {"ray"}, "scenes": {"ray", "torch"}}
MAX_LINES = 300
# files allowed past MAX_LINES, each with why; an entry that is no longer over the limit fails the test too
LONG_FILES = {
    "training/train.py": "one concept, the training run's outline from corpus to saved pair, read top to bottom",
    "training/evaluate.py": "one concept, the model card's measurements, each a short function the card lists",
}


def imported_modules(path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_imports_run_one_way():
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for module in imported_modules(path):
                top = module.split(".")[0]
                if (top in ALLOWED and top != package and top not in allowed) or \
                        top in THIRD_PARTY_BANNED.get(package, set()):
                    bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


def test_every_package_is_under_the_rules():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}  # scripts, not layered
    assert packages == set(ALLOWED), packages ^ set(ALLOWED)


def test_no_file_runs_past_the_line_limit_unless_allowed():
    over = {str(p.relative_to(ROOT)): n for package in ALLOWED for p in sorted((ROOT / package).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(over) <= set(LONG_FILES), {f: n for f, n in over.items() if f not in LONG_FILES}
    assert set(LONG_FILES) <= set(over), f"no longer over {MAX_LINES} lines: {set(LONG_FILES) - set(over)}"


def module_imports(path, modules: set[str]) -> set[str]:
    """The modules of ours (in `modules`) a file imports, at any depth; `from pkg import mod` counts as pkg.mod,
    and an import under `if TYPE_CHECKING:` (a type hint's, never run) does not count."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
               for child in node.body for n in ast.walk(child)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names}
    return out & modules


def import_circles(root, packages) -> list[list[str]]:
    """The circles in the graph of imports between modules (function-level imports included): each strongly
    connected component of more than one module, as a sorted list of module names."""
    files = {p.relative_to(root).with_suffix("").as_posix().replace("/", "."): p
             for package in packages for p in sorted((root / package).rglob("*.py"))}
    files = {m.removesuffix(".__init__"): p for m, p in files.items()}
    graph = {m: module_imports(p, set(files)) - {m} for m, p in files.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(m):  # Tarjan's algorithm
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in graph[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return circles


def test_no_import_circle_even_through_function_level_imports():
    assert import_circles(ROOT, ALLOWED) == []


def test_the_circle_check_finds_a_circle_hidden_in_a_function(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/__init__.py").write_text("")
    (tmp_path / "pkg/a.py").write_text("from pkg.b import g\n")
    (tmp_path / "pkg/b.py").write_text("def g():\n    from pkg import a\n")
    (tmp_path / "pkg/c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import X\n")
    (tmp_path / "pkg/d.py").write_text("from pkg.c import Y\n")
    assert import_circles(tmp_path, ["pkg"]) == [["pkg.a", "pkg.b"]]


def test_the_rule_would_catch_a_backward_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from actors.metrics import record_batch\n    import ray.data\n")
    assert {"actors.metrics", "ray.data"} <= imported_modules(f)


def test_engine_tests_import_no_ray_or_actors():
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p in sorted((ROOT / "tests/engine").rglob("*.py"))
           for m in imported_modules(p) if m.split(".")[0] in ("ray", "actors", "pipeline")]
    assert not bad, "\n".join(bad)


def test_importing_every_engine_module_loads_no_ray():
    modules = sorted(p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
                     for p in (ROOT / "engine").rglob("*.py"))
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + \
           "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray was imported'\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_test_puts_benchmarks_on_sys_path():
    bad = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("*.py"))
           if p.name != "test_layout.py" and "sys.path" in p.read_text()]
    assert not bad, bad
