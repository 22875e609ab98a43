"""benchmarks/gpu_check.py, the first script run on a lent GPU, in its CPU mode (Triton kernels interpreted): it runs
green here, so it cannot rot before a GPU comes. A fresh process, as on the GPU machine: TRITON_INTERPRET must be
set before anything imports triton, which the script does itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_runs_green_on_a_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--rows", "4",
                          "--families", "qwen2_5_vl", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == [] and len(report["checks"]) >= 15
    assert any(k.startswith("rejection kernel") and "k=8" in k for k in report["checks"])
    assert any("sampled" in k for k in report["checks"]) and any("Triton kernel" in k for k in report["checks"])
