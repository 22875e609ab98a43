"""Where specray's time goes, phase by phase, against what each phase would cost at this machine's matmul peak.

    python benchmarks/time_budget.py [--rows 256] [--dtype auto] [--drafter PATH] [--compressed] [--repeats 2]

The engine runs the held-out rows (at the engine's default batch, greedy, max 64 new tokens) with timers around its phases:
  preprocessing    the processor on each row (decoding the image included), as the pipeline's preprocess does
  vision tower     the tower's forward (engine/vision_tower.py), merger included
  prompt prefill   the decoder over the prompts (the rest of the prompt embedding: HF's glue around the tower)
  decode           the target's verify forwards (one per round: k+1 positions per row)
  drafting         the drafter's prefill and its draft steps (with --drafter)
  the rest         Python between kernels: the round's bookkeeping, sampling, retiring rows, HF's glue
Each phase's FLOPs are counted from the model's shapes (every linear, the attention over the real context); the
peak is measured in the same run: a bf16/float32 linear at the prefill's shape. "At peak" is FLOPs / peak: what
the phase would cost if every FLOP ran at the peak, and "efficiency" is that over the measured time.
"""
from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import cpu_flags, shipped_compression  # noqa: E402
from engine.config import Compression, EngineConfig  # noqa: E402
from engine.engine import SpecEngine  # noqa: E402
from engine.processor import encode, load_processor  # noqa: E402
from engine.request import Request, SamplingParams  # noqa: E402
from scenes import corpus  # noqa: E402
from training.heldout import TEST_SEED  # noqa: E402

PARAMS = SamplingParams(max_new_tokens=64)


def matmul_peak(dtype: torch.dtype, reps: int = 20) -> float:
    """FLOP/s of one linear at a prefill's shape (3,264 tokens x 384 -> 2,176), the best of `reps`."""
    x, w = torch.randn(3264, 384, dtype=dtype), torch.randn(2176, 384, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return 2 * x.shape[0] * x.shape[1] * w.shape[0] / best


def decoder_flops_per_token(engine: SpecEngine) -> float:
    """2 x the decoder layers' linear weights: FLOPs per token through the layers (attention and head left out:
    1-2% of them on the shipped pair's short prompts)."""
    dec = engine.target.decoder
    return 2 * dec.linear_bytes() / engine.dtype.itemsize


def tower_flops_per_image(engine: SpecEngine, patches: int) -> float:
    """Every linear of the tower over an image's patches (those kept, from the pruning block on), and attention
    over the whole image (an upper bound where blocks attend within windows)."""
    t, c = engine.target.lean_tower, engine.target.compression
    if t is None:
        return float("nan")
    kept = patches
    flops = 2 * t.patch_weight.numel() * patches
    for i, p in enumerate(t.blocks):
        if i == c.visual_tower_layer:
            kept = round(c.visual_keep * patches / t.unit) * t.unit
        flops += 2 * sum(p[n].numel() for n in ("qkv", "proj", "gate_up", "down")) * kept
        flops += 4 * kept * kept * p["proj"].shape[0]
    return flops + 2 * sum(m.weight.numel() for m in t.merger_mlp if hasattr(m, "weight")) * kept / t.unit


class Timers:
    """Wraps methods so that each call adds its seconds to a phase."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.wrapped: list = []

    def wrap(self, obj, name: str, phase: str) -> None:
        f = getattr(obj, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t

        setattr(obj, name, timed)
        self.wrapped.append((obj, name))

    def remove(self) -> None:
        for obj, name in self.wrapped:
            delattr(obj, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--drafter")
    ap.add_argument("--compressed", action="store_true", help="the shipped visual-token compression")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = str(ROOT / "models/target")
    processor = load_processor(target)
    samples = [corpus.sample(TEST_SEED, i) for i in range(args.rows)]
    png = [corpus.encode_png(s.image) for s in samples]
    compression = shipped_compression() if args.compressed else Compression()
    engine = SpecEngine(EngineConfig(target, drafter=args.drafter, dtype=args.dtype, max_batch_size=EngineConfig.max_batch_size,
                                     compression=compression))
    peak = matmul_peak(engine.dtype)
    print(f"# time budget: {args.rows} held-out rows, batch {engine.max_batch}, {engine.dtype}, drafter {args.drafter}; CPU flags "
          f"{cpu_flags()} ({platform.machine()}), compression {'shipped' if args.compressed else 'none'}, {args.threads} threads; matmul peak {peak / 1e9:.0f} GFLOP/s")

    def requests():
        from PIL import Image

        return [Request(s.key, *encode(processor, s.question, Image.open(io.BytesIO(b)).convert("RGB")))
                for s, b in zip(samples, png)]

    engine.generate(requests()[:64], PARAMS)  # warm-up
    runs = []
    for _ in range(args.repeats):
        timers = Timers()
        tm = engine.target
        prefilled = [0]
        prefill = tm.prefill

        def counting(cache, pe, *a, **k):  # prompt tokens the decoder sees (fewer with pruned image tokens)
            prefilled[0] += sum(pe.lengths)
            return prefill(cache, pe, *a, **k)

        tm.prefill = counting
        timers.wrap(tm, "embed_prompts", "prompt embedding")
        if tm.lean_tower is not None:
            timers.wrap(tm.lean_tower, "_forward", "vision tower")
        timers.wrap(tm, "prefill", "prompt prefill")
        engine.stats = type(engine.stats)()
        t = time.perf_counter()
        pre = time.perf_counter()
        reqs = requests()
        timers.seconds["preprocessing"] = time.perf_counter() - pre
        results = engine.generate(reqs, PARAMS)
        wall = time.perf_counter() - t
        timers.remove()  # the counting wrapper goes with it
        st = engine.stats
        s = dict(timers.seconds)
        s["prompt prefill"] += s.pop("prompt embedding") - s.get("vision tower", 0.0)  # HF's glue counts as prefill
        s["decode"] = st.verify_s
        s["drafting"] = st.draft_s + st.drafter_prefill_s
        s["the rest"] = wall - sum(s.values())
        runs.append((wall, s, results, st, prefilled[0]))
    wall, s, results, st, prompt_tokens = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    tokens = sum(r.num_output_tokens for r in results)
    per_token = decoder_flops_per_token(engine)
    grid = reqs[0].model_inputs["image_grid_thw"][0]
    flops = {
        "vision tower": tower_flops_per_image(engine, int(grid.prod())) * len(reqs),
        "prompt prefill": per_token * prompt_tokens,
        "decode": per_token * (st.row_rounds + st.drafted),  # each round: a row's last token and its drafts
    }
    print(f"wall {wall:.2f} s, {tokens} output tokens, {tokens / wall:.0f} tok/s (median of {args.repeats})")
    print("| phase | seconds | share | GFLOP | at peak (s) | efficiency |")
    print("|---|---|---|---|---|---|")
    for phase in ("preprocessing", "vision tower", "prompt prefill", "decode", "drafting", "the rest"):
        sec = s.get(phase, 0.0)
        f = flops.get(phase)
        at_peak = f / peak if f else None
        cols = (f"{f / 1e9:.0f}", f"{at_peak:.2f}", f"{100 * at_peak / sec:.0f}%") if f and sec > 0 else ("-",) * 3
        print(f"| {phase} | {sec:.2f} | {100 * sec / wall:.0f}% | {' | '.join(cols)} |")
    total = sum(f for f in flops.values() if f == f)
    print(f"| all | {wall:.2f} | 100% | {total / 1e9:.0f} | {total / peak:.2f} | {100 * total / peak / wall:.0f}% |")


if __name__ == "__main__":
    main()
