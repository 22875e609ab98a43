"""The engine on a GPU, in one run (no Ray): the checks benchmarks/gpu_check.sh runs first on any lent GPU.

    python benchmarks/gpu_check.py [--device cuda] [--rows 64] [--families qwen2_5_vl,gemma3] [--out DIR]

1. Triton kernels compiled for the device (not interpreted): the rejection-sampling kernel against the torch
   rule at k = 1, 3, 4 and 8 (one compiled kernel for every k) and vocabularies up to Qwen's 151,936: accepted
   counts equal, the extra token equal but where the draw is within 1e-5 of a CDF boundary (one row per case
   at most); int8 / int4 weight-only linears through QuantLinear against the dequantized weight, and on CUDA
   timed against dequantize + cuBLAS and a bf16 weight, with the kernel QuantLinear picked for those rows.
2. Exactness on the device: the shipped pair in float32, HF `generate` (one row at a time) against the engine
   with no drafter, the VLM drafter, the text drafter and n-gram; then tiny Qwen2.5-VL and Gemma 3 checkpoints
   (benchmarks/family_models.py) the same way. Counts rows equal; exits 1 if any differs.
3. Sampling (temperature 0.7, top-p 0.9), plain and with the VLM drafter, against HF's sampling: accuracy on the
   rows' answers within 10% of the rows (2 at least) of HF's.
4. bf16: the engine's rows against HF's bf16 rows (agreement only: bf16 rounding differs between kernels).
5. The compiled step against eager (engine/captured_step.py: reduce-overhead CUDA graphs on CUDA, inductor on a
   CPU): argmax agreement, time per step of both, compile time (benchmarks/captured_step.py).
Prints one table and writes it to DIR/gpu_check.json ($OUT by default). With --device cpu it runs the same checks
on the CPU (kernels through TRITON_INTERPRET=1): tests/test_gpu_check.py runs that mode, so the script cannot rot.
"""
from __future__ import annotations

import argparse
import json
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
from scenes import corpus  # noqa: E402
from training.heldout import TEST_SEED, heldout_requests  # noqa: E402

PARAMS = SamplingParams(max_new_tokens=32)
SAMPLED = SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.9, seed=11)
# The rejection kernel and the torch rule agree on every accepted count; the extra token may differ where the
# draw lands within float rounding of a boundary of the residual's CDF (the kernel sums it in BLOCK_V chunks, torch
# in one cumsum): allowed in at most one row per case, and only there.
CDF_EDGE = 1e-5
# Sampled answers against HF's sampled answers (both at temperature 0.7, different random streams): accuracy within
# 10% of the rows (2 rows at least), where broken sampling (a wrong rejection rule, a mis-warped distribution)
# loses far more.
SAMPLED_SHARE, SAMPLED_ROWS = 0.10, 2


def _rejection_rows(device: str) -> list[tuple[str, str]]:
    from kernels.acceptance import rejection_sample as reference
    from kernels.acceptance_triton import rejection_sample

    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for n, k, v in ((64, 1, 1024), (64, 4, 1024), (256, 8, 32000), (32, 3, 151936)):
        p = torch.softmax(torch.randn(n, k + 1, v, device=device, generator=g) * 2, -1)
        q = torch.softmax(torch.randn(n, k, v, device=device, generator=g) * 2, -1)
        drafts = torch.multinomial(q.view(-1, v), 1, generator=g).view(n, k)
        num = torch.randint(0, k + 1, (n,), device=device, generator=g)
        u, ru = torch.rand(n, k, device=device, generator=g), torch.rand(n, device=device, generator=g)
        (acc_w, nxt_w), (acc_g, nxt_g) = reference(drafts, q, p, num, u, ru), rejection_sample(drafts, q, p, num, u, ru)
        same_acc = torch.equal(acc_w.long().cpu(), acc_g.long().cpu())
        differ = (nxt_w.cpu() != nxt_g.cpu()).nonzero().flatten().tolist()
        edges = [_at_cdf_edge(p, q, drafts, num, acc_w, ru, r, int(nxt_w[r]), int(nxt_g[r])) for r in differ]
        ok = same_acc and len(differ) <= 1 and all(edges)
        result = (f"accepted counts equal, {n - len(differ)}/{n} next tokens equal"
                  + (f" ({len(differ)} at a CDF edge)" if differ and all(edges) else ""))
        rows.append((f"rejection kernel n={n} k={k} V={v}", result if ok else f"DIFFERS: {result}"))
    return rows


def _at_cdf_edge(p, q, drafts, num, accepted, ru, row: int, a: int, b: int) -> bool:
    """Whether row's draw lands within CDF_EDGE of the boundary between tokens a and b (float64)."""
    k = drafts.shape[1]
    acc = int(accepted[row])
    target = p[row, acc].double()
    if acc < int(num[row]):
        residual = (target - q[row, min(acc, k - 1)].double()).clamp(min=0)
        target = residual if residual.sum() > 0 else target
    cdf = target.cumsum(0)
    threshold = float(ru[row]) * float(cdf[-1])
    return abs(float(cdf[min(a, b)]) - threshold) < CDF_EDGE * float(cdf[-1])


def _quant_rows(device: str) -> list[tuple[str, str]]:
    """int8 / int4 weight-only linears through QuantLinear (the Triton kernel on CUDA) against the dequantized
    weight; timed against dequantize + the dense matmul (cuBLAS on CUDA) at a decode's and a prefill's rows."""
    from kernels.cuda_timing import cuda_ms
    from kernels.quant import QuantLinear, dequantize, quantize

    rows = []
    for bits in (8, 4):
        w = torch.randn(4096, 4096) if device == "cuda" else torch.randn(1024, 512)
        qw = quantize(w, bits, group_size=64)
        linear = QuantLinear(qw, device)
        dense_qw = type(qw)(qw.bits, qw.group_size, qw.shape, qw.qweight.to(device), qw.scales.to(device),
                            None if qw.zeros is None else qw.zeros.to(device))
        for m in (64, 2048) if device == "cuda" else (37,):
            x = torch.randn(m, w.shape[1], device=device, dtype=torch.bfloat16)
            want = x.float() @ dequantize(dense_qw, torch.float32).T
            got = linear(x)
            err = (got.float() - want).abs().max().item() / want.abs().max().item()
            times = ""
            if device == "cuda":
                ours = cuda_ms(lambda: linear(x))
                dense = cuda_ms(lambda: torch.nn.functional.linear(x, dequantize(dense_qw, torch.bfloat16)))
                held = dequantize(dense_qw, torch.bfloat16)
                bf16 = cuda_ms(lambda: torch.nn.functional.linear(x, held))
                times = (f"; {linear.kernel_for(m)} {ours:.3f} ms, dequantize+cuBLAS {dense:.3f} ms, "
                         f"bf16 weight {bf16:.3f} ms")
            rows.append((f"int{bits} linear {m}x{w.shape[1]} @ {w.shape[1]}x{w.shape[0]} ({linear.kernel_for(m)})",
                         f"max rel error {err:.2e}" + ("" if err < 2e-2 else " TOO HIGH") + times))
            if device != "cuda":  # the Triton kernel itself, interpreted (a CPU's QuantLinear uses torch's kernels)
                from kernels.quant_triton import quant_linear

                err = (quant_linear(x, dense_qw).float() - want).abs().max().item() / want.abs().max().item()
                rows.append((f"int{bits} Triton kernel {m}x{w.shape[1]} (interpreted)",
                             f"max rel error {err:.2e}" + ("" if err < 2e-2 else " TOO HIGH")))
    return rows


def compiled_rows(models: Path, device: str) -> list[tuple[str, str]]:
    """The decode and verify steps compiled (engine/captured_step.py; CUDA graphs on CUDA) against eager ones on the
    same cache (benchmarks/captured_step.py): argmax agreement, time per step, each bucket's first call. CUDA: the
    shipped target in bf16 at 1 and 32 rows (agreement at least 95%: bf16 rounds differently once fused); a CPU:
    the one-layer drafter in float32, 3 rows in a padded bucket of 4, every position equal."""
    from benchmarks.captured_step import compare

    cuda = device == "cuda"
    path, dtype = (models / "target", torch.bfloat16) if cuda else (models / "drafter-vlm", torch.float32)
    rows = compare(str(path), device, dtype, [1, 32] if cuda else [3], [1, 5] if cuda else [1], context=64,
                   iters=30 if cuda else 3, slots=None if cuda else 4)
    out = []
    for r in rows:
        ok = r["agreement"] >= (0.95 if cuda else 1.0)
        out.append((f"compiled step against eager, {path.name} b={r['batch']} T={r['T']}",
                    f"argmax agreement {100 * r['agreement']:.1f}%, eager {r['eager_ms']:.3f} ms, compiled "
                    f"{r['compiled_ms']:.3f} ms ({r['ratio']:.2f}x), first call {r['first_call_s']:.1f} s"
                    + ("" if ok else " DIFFERS")))
    return out


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


def sampled(target: str, drafter: str, requests, answers: list[str], device: str) -> list[tuple[str, str]]:
    """Sampling (temperature 0.7, top-p 0.9) through the engine, plain and with the VLM drafter (the rejection
    rule: on CUDA the Triton kernel), against HF's own sampling: each one's accuracy against the rows' answers."""
    def accuracy(results) -> float:
        return 100 * sum(r.text.strip() == a for r, a in zip(results, answers)) / len(answers)

    hf = HFBackend(EngineConfig(target, backend="hf", dtype="float32"), device=device)
    base = accuracy([r for req in requests for r in hf.generate([req], SAMPLED)])
    rows = []
    for name, d in (("none", None), ("vlm", drafter)):
        engine = SpecEngine(EngineConfig(target, d, dtype="float32", max_batch_size=32), device=device)
        out = engine.generate(requests, SAMPLED)
        acc = accuracy(out)
        allowed = 100 * max(SAMPLED_ROWS, SAMPLED_SHARE * len(answers)) / len(answers)
        ok = abs(acc - base) <= allowed and all(r.error is None for r in out)
        rows.append((f"{Path(target).name} fp32 sampled, drafter {name}",
                     f"accuracy {acc:.1f}% against HF sampled {base:.1f}%" + ("" if ok else " DIFFERS")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--families", default="qwen2_5_vl,gemma3", help="tiny checkpoints checked too (comma-separated)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="write gpu_check.json here (default: $OUT)")
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores, interpreted)"
    print(f"# gpu_check on {name}: torch {torch.__version__}, cuda {torch.version.cuda}", flush=True)
    started = time.perf_counter()
    table = _rejection_rows(args.device) + _quant_rows(args.device)
    models = Path(args.models)
    target = str(models / "target")
    requests = heldout_requests(load_processor(target), args.rows)
    table += exactness(target, {"none": None, "vlm": str(models / "drafter-vlm"),
                                "text": str(models / "drafter-text"), "ngram": "ngram"}, requests, args.device)
    answers = [corpus.sample(TEST_SEED, i).answer for i in range(args.rows)]
    table += sampled(target, str(models / "drafter-vlm"), requests, answers, args.device)
    from benchmarks.families import requests_for
    from benchmarks.family_models import build_family

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "specray-gpu-check"
    for family in filter(None, args.families.split(",")):
        path = str(build_family(family, tmp / family))
        table += exactness(path, {"none": None, "ngram": "ngram"}, requests_for(path, 8), args.device)
    table.append(bf16_agreement(target, requests, args.device))
    table += compiled_rows(models, args.device)
    width = max(len(a) for a, _ in table)
    print(f"\n| {'check'.ljust(width)} | result |\n|{'-' * (width + 2)}|---|")
    for a, b in table:
        print(f"| {a.ljust(width)} | {b} |")
    failed = [a for a, b in table if "DIFFERS" in b or "TOO HIGH" in b
              or ("equal to HF (" in b and b.split("/")[0] != b.split("/")[1].split()[0])]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gpu_check.json").write_text(json.dumps(
            {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "rows": args.rows,
             "seconds": round(time.perf_counter() - started, 1), "checks": dict(table), "failed": failed}, indent=1))
    print(f"\n{len(table) - len(failed)}/{len(table)} checks passed in {time.perf_counter() - started:.0f} s")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
