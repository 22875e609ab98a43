"""The layout's rules, checked on the source: imports run pipeline -> actors -> engine -> kernels and never back,
the engine and its tests import no Ray, and no test reaches into benchmarks through sys.path."""
from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

LAYERS = ["pipeline", "actors", "engine", "kernels"]  # each may import only the ones after it
THIRD_PARTY_BANNED = {"engine": {"ray"}, "kernels": {"ray"}}


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
    for i, layer in enumerate(LAYERS):
        above = set(LAYERS[:i])
        for path in sorted((ROOT / layer).rglob("*.py")):
            for module in imported_modules(path):
                top = module.split(".")[0]
                if top in above or top in THIRD_PARTY_BANNED.get(layer, set()):
                    bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


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
