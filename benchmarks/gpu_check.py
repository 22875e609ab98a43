"""The engine on a GPU, in one run (no Ray): the checks benchmarks/gpu_check.sh runs first on any lent GPU.

    python benchmarks/gpu_check.py [--device cuda] [--rows 64]

1. Triton kernels compiled for the device (not interpreted): the rejection-sampling kernel against the torch
   rule, draw for draw; the int8 / int4 weight-only linear against the dequantized weight.
2. Exactness on the device: the shipped pair in float32, HF `generate` (one row at a time) against the engine
   with no drafter, the VLM drafter, the text drafter and n-gram; then tiny Qwen2.5-VL and Gemma 3 checkpoints
   (benchmarks/family_models.py) the same way. Counts rows equal; exits 1 if any differs.
3. bf16: the engine's rows against HF's bf16 rows (agreement only: bf16 rounding differs between kernels).
Prints one table; with --device cpu it runs the same checks on the CPU (kernels through TRITON_INTERPRET=1).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# On a CPU the Triton kernels run interpreted, and the variable must be set before anything imports triton
# (transformers' masking utilities import torch._dynamo, which imports it): the device is read here, before torch
# (without --device: a CPU where no NVIDIA device node exists, as torch.cuda.is_available() will then say).
_device = (sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv[:-1]
           else "cuda" if os.path.exists("/dev/nvidia0") else "cpu")
if _device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.engine import SpecEngine  # noqa: E402
from engine.hf_backend import HFBackend  # noqa: E402
from engine.processor import load_processor  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from training.heldout import heldout_requests  # noqa: E402

PARAMS = SamplingParams(max_new_tokens=32)


def kernels(device: str) -> list[tuple[str, str]]:
    from kernels.acceptance import rejection_sample as reference
    from kernels.acceptance_triton import rejection_sample
    from kernels.quant import dequantize, quantize
    from kernels.quant_triton import quant_linear

    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for n, k, v in ((64, 4, 1024), (256, 8, 32000)):
        p = torch.softmax(torch.randn(n, k + 1, v, device=device, generator=g) * 2, -1)
        q = torch.softmax(torch.randn(n, k, v, device=device, generator=g) * 2, -1)
        drafts = torch.multinomial(q.view(-1, v), 1, generator=g).view(n, k)
        num = torch.randint(0, k + 1, (n,), device=device, generator=g)
        u, ru = torch.rand(n, k, device=device, generator=g), torch.rand(n, device=device, generator=g)
        want = reference(drafts, q, p, num, u, ru)
        got = rejection_sample(drafts, q, p, num, u, ru)
        same = all(torch.equal(a.long().cpu(), b.long().cpu()) for a, b in zip(want, got))
        rows.append((f"rejection kernel n={n} k={k} V={v}", "draw-for-draw equal" if same else "DIFFERS"))
    for bits in (8, 4):
        w = torch.randn(1024, 512)
        qw = quantize(w, bits, group_size=64)
        qw_dev = type(qw)(qw.bits, qw.group_size, qw.shape, qw.qweight.to(device), qw.scales.to(device),
                          None if qw.zeros is None else qw.zeros.to(device))
        x = torch.randn(37, 512, device=device, dtype=torch.bfloat16)
        want = x.float() @ dequantize(qw_dev, torch.float32).T
        err = (quant_linear(x, qw_dev).float() - want).abs().max().item() / want.abs().max().item()
        rows.append((f"int{bits} linear 37x512 @ 512x1024", f"max rel error {err:.2e}" + ("" if err < 2e-2 else " TOO HIGH")))
    return rows


def _equal(a, b) -> int:
    return sum((x.text, x.num_output_tokens) == (y.text, y.num_output_tokens) for x, y in zip(a, b))


def exactness(target: str, drafters: dict[str, str | None], requests, device: str) -> list[tuple[str, str]]:
    hf = HFBackend(EngineConfig(target, backend="hf", dtype="float32"), device=device)
    oracle = [r for req in requests for r in hf.generate([req], PARAMS)]
    rows = []
    for name, drafter in drafters.items():
        engine = SpecEngine(EngineConfig(target, drafter, dtype="float32", max_batch_size=32), device=device)
        t = time.perf_counter()
        out = engine.generate(requests, PARAMS)
        rows.append((f"{Path(target).name} fp32, drafter {name}",
                     f"{_equal(out, oracle)}/{len(requests)} equal to HF ({time.perf_counter() - t:.1f}s)"))
    return rows


def bf16_agreement(target: str, requests, device: str) -> tuple[str, str]:
    hf = HFBackend(EngineConfig(target, backend="hf", dtype="bfloat16"), device=device)
    engine = SpecEngine(EngineConfig(target, None, dtype="bfloat16", max_batch_size=32), device=device)
    oracle = [r for req in requests for r in hf.generate([req], PARAMS)]
    return (f"{Path(target).name} bf16 (agreement, not exactness)",
            f"{_equal(engine.generate(requests, PARAMS), oracle)}/{len(requests)} equal to HF bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--models", default=str(ROOT / "models"))
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# gpu_check on {name}: torch {torch.__version__}, cuda {torch.version.cuda}", flush=True)
    table = kernels(args.device)
    models = Path(args.models)
    requests = heldout_requests(load_processor(str(models / "target")), args.rows)
    table += exactness(str(models / "target"), {"none": None, "vlm": str(models / "drafter-vlm"),
                                                "text": str(models / "drafter-text"), "ngram": "ngram"},
                       requests, args.device)
    from benchmarks.families import requests_for
    from benchmarks.family_models import build_family

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "specray-gpu-check"
    for family in ("qwen2_5_vl", "gemma3"):
        path = str(build_family(family, tmp / family))
        table += exactness(path, {"none": None, "ngram": "ngram"}, requests_for(path, 8), args.device)
    table.append(bf16_agreement(str(models / "target"), requests, args.device))
    width = max(len(a) for a, _ in table)
    print(f"\n| {'check'.ljust(width)} | result |\n|{'-' * (width + 2)}|---|")
    for a, b in table:
        print(f"| {a.ljust(width)} | {b} |")
    failed = [a for a, b in table if "DIFFERS" in b or "TOO HIGH" in b
              or ("equal to HF (" in b and b.split("/")[0] != b.split("/")[1].split()[0])]
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
