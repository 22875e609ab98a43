"""The decoder's two attention paths on a CPU, at the shapes the shipped pair decodes and prefills: SDPA over a
boolean mask against float32 matmuls + softmax over an additive mask (engine/attention.py: in_float32 picks
between them by context length). Prints each path's median time, their ratio, and each one's largest error
against float64, in bf16 and float32.

    python benchmarks/attention_paths.py [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import cpu_flags  # noqa: E402
from engine.attention import MATH_DECODE_KEYS, MATH_PREFILL_KEYS, MATH_VERIFY_KEYS  # noqa: E402

# rows, keys per row, queries per row (1: decode; 5: a verify of 4 drafts; more: a prefill); 2 kv heads, group 3
SHAPES = [(128, 40, 1), (128, 40, 5), (128, 96, 1), (128, 112, 1), (128, 128, 1), (128, 160, 1), (64, 100, 5),
          (128, 128, 5), (82, 33, 33), (64, 60, 60), (128, 80, 80),
          (40, 96, 96), (16, 400, 400)]


def median_us(f, reps: int = 40) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# attention paths; CPU flags {cpu_flags()}, {args.threads} threads; float32 path used up to "
          f"{MATH_DECODE_KEYS} keys (1 query) / {MATH_VERIFY_KEYS} (<= 16 queries) / {MATH_PREFILL_KEYS} (prefill)")
    print("| dtype | rows | keys | queries | SDPA (us) | float32 matmuls (us) | ratio | SDPA error | matmul error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for n, keys, t in SHAPES:
            g = 3 * t
            gen = torch.Generator().manual_seed(n * keys + t)
            q = torch.randn(n, 2, g, 64, generator=gen).to(dtype)
            k, v = (torch.randn(n, 2, keys, 64, generator=gen).to(dtype) for _ in range(2))
            lengths = torch.randint(keys // 2, keys + 1, (n,), generator=gen)
            allowed = (torch.arange(keys)[None, :] < lengths[:, None])[:, None, None, :].expand(n, 1, g, keys)
            additive = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))

            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.125)

            def matmuls():
                scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(0.125).add_(additive)
                return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(dtype)

            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed, scale=0.125)
            a, b = median_us(sdpa), median_us(matmuls)
            ea, eb = ((f().double() - ref).abs().max().item() for f in (sdpa, matmuls))
            print(f"| {str(dtype).split('.')[-1]} | {n} | {keys} | {t} | {a:.0f} | {b:.0f} | {b / a:.2f} | "
                  f"{ea:.1e} | {eb:.1e} |")


if __name__ == "__main__":
    main()
