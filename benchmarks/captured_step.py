"""Compiled decode and verify steps (engine/captured_step.py) against eager ones, in one run: time per step, the
ratio compiled / eager, token agreement (argmax equal), and what each bucket's compile cost.

    python benchmarks/captured_step.py [--device cpu|cuda] [--dtype auto] [--batches 1,8,32] [--verify 5]

On the shipped target (models/target) by default. Each (batch, T) is one shape bucket: a decode step (T = 1) and
a verify step (T = --verify, i.e. k + 1) per batch size, every row with a context of --context cached positions
(a prefill of random tokens, run eagerly). Both paths run the same inputs on the same cache; times are medians
over --iters steps after two warm-up steps (on CUDA, timed with synchronisation). benchmarks/gpu_check.py runs
`compare` as its "compiled step against eager" check.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.captured_step import CapturedStep  # noqa: E402
from engine.device import resolve_dtype  # noqa: E402
from engine.model import LoadedModel  # noqa: E402


def _median_s(fn, device: str, iters: int) -> float:
    times = []
    for i in range(iters + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def compare(path: str, device: str, dtype: torch.dtype, batches: list[int], ts: list[int], context: int = 64,
            iters: int = 20, slots: int | None = None) -> list[dict]:
    """One row per (batch, T): eager and compiled seconds per step, their ratio, the share of positions whose argmax
    agrees, and the compiled bucket's first call (compile, capture, one run). `slots`: the cache's rows (default:
    the largest batch), so a batch below it runs in a padded bucket."""
    dec = LoadedModel(path, device, dtype).decoder
    # the compiled step's own copy: compiling holds a CPU's packed bf16 weights plain (engine/captured_step.py)
    compiled = CapturedStep(LoadedModel(path, device, dtype).decoder, device, True)
    cache = dec.new_cache()
    cache.allocate(slots or max(batches), context + max(ts) + 1)
    g = torch.Generator().manual_seed(0)
    vocab = dec.embed_weight.shape[0]
    prompt = torch.randint(5, vocab, (cache.slots, context), generator=g).to(device)
    dec.forward(cache, dec.embed(prompt), torch.zeros(cache.slots, dtype=torch.long, device=device), length=context)
    eager = CapturedStep(dec, device, False)
    rows = []
    for n in batches:
        for t in ts:
            ids = torch.randint(5, vocab, (n, t), generator=g).to(device)
            starts = torch.full((n,), context, dtype=torch.long, device=device)
            before = compiled.compile_s
            got = compiled(cache, ids, starts, context + t)
            first_s = compiled.compile_s - before
            want = eager(cache, ids, starts, context + t)
            agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
            eager_s = _median_s(lambda: eager(cache, ids, starts, context + t), device, iters)
            compiled_s = _median_s(lambda: compiled(cache, ids, starts, context + t), device, iters)
            rows.append({"batch": n, "T": t, "eager_ms": 1e3 * eager_s, "compiled_ms": 1e3 * compiled_s,
                         "ratio": compiled_s / eager_s, "agreement": agree, "first_call_s": first_s})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| batch | T | eager ms/step | compiled ms/step | compiled / eager | argmax agreement | first call s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['T']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['ratio']:.2f}x | "
              f"{100 * r['agreement']:.1f}% | {r['first_call_s']:.1f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=str(ROOT / "models" / "target"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--verify", type=int, default=5, help="T of the verify step (k + 1)")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype, "specray", args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# captured step on {name}, {Path(args.model).name} {dtype}, context {args.context}", flush=True)
    t0 = time.perf_counter()
    rows = compare(args.model, args.device, dtype, [int(b) for b in args.batches.split(",")], [1, args.verify],
                   args.context, args.iters)
    print(table(rows))
    print(f"\n{len(rows)} buckets compiled in {sum(r['first_call_s'] for r in rows):.1f} s (first calls); "
          f"run {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
