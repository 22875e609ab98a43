"""What each compression setting buys and what it costs, against the uncompressed target, in one run.

    python benchmarks/compression.py [--per-task 100] [--batch 16] [--device cpu|cuda] [--threads 2]
                                     [--only NAME,NAME] [--rounds 3] [--json out.json]

Rows: the held-out test split, `--per-task` rows of each task (caption, vqa, position, ocr), greedy, max 64 new
tokens, the engine at the job's default dtype (`auto`: bf16 on a GPU and on a CPU with native bf16, else
float32). Each setting runs in its own process (so its peak memory is its own), after a warm-up on 16 rows.
The settings run in turn, `--rounds` times (uncompressed among them): each setting's times are the median of
its rounds, so a machine that drifts during the run slows every setting alike (one round after another drifted:
pruning read 0.7x decode in one run, 1.27x generate interleaved). Per setting it prints:
  - token agreement: teacher-forced, the share of the uncompressed target's output tokens the setting's model
    picks given the same prefix; exact: the share of rows whose greedy output is the same text;
  - accuracy per task (exact match with the corpus's answer) and the change in points against uncompressed;
  - prefill speed (every row prefilled in batches of --batch: tower, projector, pruning, decoder), decode
    tokens/s (output tokens over the generate time not spent in prefill) and end-to-end tokens/s, each as a
    ratio to the uncompressed target measured in the same run;
  - the weights the process holds and its peak resident memory (ru_maxrss), relative to uncompressed;
  - for self-speculation (and the shipped VLM drafter, for comparison): acceptance and speedup.
Then the kernels alone: every linear shape of the target's decoder at 1 to 1280 rows, fp32 / bf16 / int8 / int4,
as time relative to fp32 (the CPU path must beat fp32; bf16 is what the engine runs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.agreement import token_agreement  # noqa: E402
from engine.device import resolve_dtype  # noqa: E402
from training.evaluate_pruning import tower_layer_of  # noqa: E402

TASKS = ("caption", "vqa", "position", "ocr")
TOWER_LAYER = tower_layer_of(ROOT / "models")
SETTINGS = {  # name -> (drafter, compression section)
    "uncompressed": (None, {}),
    "int8": (None, {"weights": "int8"}),
    "int4-g64": (None, {"weights": "int4", "group_size": 64}),
    "int4-g32": (None, {"weights": "int4", "group_size": 32}),
    "prune-attention-0.75": (None, {"visual_keep": 0.75, "visual_method": "attention"}),
    "prune-diversity-0.75": (None, {"visual_keep": 0.75, "visual_method": "diversity"}),
    "prune-attention-0.5": (None, {"visual_keep": 0.5, "visual_method": "attention"}),
    "prune-diversity-0.5": (None, {"visual_keep": 0.5, "visual_method": "diversity"}),
    "prune-attention-0.5-merge": (None, {"visual_keep": 0.5, "visual_method": "attention", "visual_merge": True}),
    "prune-diversity-0.5-merge": (None, {"visual_keep": 0.5, "visual_method": "diversity", "visual_merge": True}),
    "prune-diversity-0.25-merge": (None, {"visual_keep": 0.25, "visual_method": "diversity", "visual_merge": True}),
    "int8+prune-diversity-0.5-merge": (None, {"weights": "int8", "visual_keep": 0.5, "visual_method": "diversity",
                                             "visual_merge": True}),
    # inside the tower, before the block the shipped target learned to lose tokens at (its recipe's token
    # dropout, TOWER_LAYER): the tower's work shrinks too
    "prune-tower-0.75": (None, {"visual_keep": 0.75, "visual_method": "diversity", "visual_tower_layer": TOWER_LAYER}),
    "prune-tower-0.5": (None, {"visual_keep": 0.5, "visual_method": "diversity", "visual_tower_layer": TOWER_LAYER}),
    "prune-tower-spread-0.5": (None, {"visual_keep": 0.5, "visual_method": "spread", "visual_tower_layer": TOWER_LAYER}),
    "int8+prune-tower-spread-0.5": (None, {"weights": "int8", "visual_keep": 0.5, "visual_method": "spread",
                                           "visual_tower_layer": TOWER_LAYER}),
    "self-int8": ("self-int8", {}),
    "self-int4": ("self-int4", {}),
    "drafter-vlm (shipped pair)": (str(ROOT / "models/drafter-vlm"), {}),
}


def load_rows(per_task: int):
    from engine.processor import load_processor

    from scenes import corpus
    from training.heldout import TEST_SEED, heldout_requests

    processor = load_processor(str(ROOT / "models/target"))
    requests, answers, tasks = [], [], []
    for task in TASKS:
        requests += heldout_requests(processor, per_task, task=task)
        answers += [corpus.sample(TEST_SEED, i, task).answer for i in range(per_task)]
        tasks += [task] * per_task
    return requests, answers, tasks


def child(args) -> None:
    """One setting, in this process: generate, time, score; JSON on stdout."""
    from engine.config import Compression, EngineConfig
    from engine.engine import SpecEngine
    from engine.request import SamplingParams

    torch.set_num_threads(args.threads)
    drafter, section = SETTINGS[args.child]
    requests, answers, tasks = load_rows(args.per_task)
    params = SamplingParams(max_new_tokens=64)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine = SpecEngine(EngineConfig(str(ROOT / "models/target"), drafter, max_batch_size=args.batch,
                                     compression=Compression(**section)), device=args.device)
    engine.generate(requests[:16], params)  # warm-up
    from training.evaluate_pruning import prefill_seconds

    prefill_s = prefill_seconds(engine, requests, args.batch, sync := (torch.cuda.synchronize if args.device == "cuda"
                                                                       else (lambda: None)))
    engine.stats = type(engine.stats)()
    sync()
    t0 = time.perf_counter()
    out = engine.generate(requests, params)
    sync()
    wall = time.perf_counter() - t0
    st = engine.stats
    result = {
        "wall_s": wall, "prefill_s": prefill_s, "engine_prefill_s": st.prefill_s, "tokens": st.tokens,
        "texts": [r.text for r in out], "token_ids": [r.token_ids for r in out],
        "accuracy": {t: sum(r.text.strip() == a for r, a, tt in zip(out, answers, tasks) if tt == t) / args.per_task
                     for t in TASKS},
        "drafted": st.drafted, "accepted": st.accepted,
        # a self-speculation drafter adds only its quantized linears (it shares the rest with the target)
        "weight_bytes": engine.target.weight_bytes() + (
            0 if drafter is None else engine.drafter.dec.quant_bytes() if drafter.startswith("self-")
            else engine.drafter.ck.weight_bytes()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_at_start_mb": rss_before / 1024,
    }
    if args.reference:
        ref = json.loads(Path(args.reference).read_text())
        agreed = token_agreement(engine.target, requests, ref["token_ids"])
        result["token_agreement"] = sum(agreed) / max(1, sum(len(t) for t in ref["token_ids"]))
        result["exact_agreement"] = sum(a == b for a, b in zip(result["texts"], ref["texts"])) / len(requests)
        if args.device == "cuda":
            result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def run_setting(name: str, args, reference: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--per-task", str(args.per_task), "--batch", str(args.batch),
           "--device", args.device, "--threads", str(args.threads)]
    if reference:
        cmd += ["--reference", reference]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def kernels(threads: int) -> list[dict]:
    from kernels.quant import QuantLinear, quantize

    torch.set_num_threads(threads)

    def timed(fn, reps: int) -> float:
        for _ in range(3):
            fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e6

    shapes = {"qkv": (640, 384), "o": (384, 384), "gate_up": (2176, 384), "down": (384, 1088)}
    rows = []
    for m in (1, 5, 16, 80, 1280):
        total = {"fp32": 0.0, "bf16": 0.0, "int8": 0.0, "int4": 0.0}
        for n, k in shapes.values():
            w, x = torch.randn(n, k), torch.randn(m, k)
            wb, xb = w.bfloat16(), x.bfloat16()
            q8, q4 = QuantLinear(quantize(w, 8), "cpu"), QuantLinear(quantize(w, 4, 64), "cpu")
            reps = 200 if m <= 80 else 20
            total["fp32"] += timed(lambda: torch.nn.functional.linear(x, w), reps)
            total["bf16"] += timed(lambda: torch.nn.functional.linear(xb, wb), reps)
            total["int8"] += timed(lambda: q8(xb), reps)
            total["int4"] += timed(lambda: q4(xb), reps)
        rows.append({"rows": m, **{f"{k}_us": v for k, v in total.items()}})
    return rows


def median_times(runs: list[dict]) -> dict:
    """One setting's rounds -> its first round's result with every time the median of the rounds'."""
    import statistics

    assert all(r["token_ids"] == runs[0]["token_ids"] for r in runs), "a setting's output changed between rounds"
    return dict(runs[0], **{k: statistics.median(r[k] for r in runs) for k in ("wall_s", "prefill_s", "engine_prefill_s")},
                rounds=len(runs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--rounds", type=int, default=3, help="every setting this many times, in turn; median times")
    ap.add_argument("--json", default="")
    ap.add_argument("--child", default="")
    ap.add_argument("--reference", default="")
    args = ap.parse_args()
    if args.child:
        return child(args)
    names = [n for n in SETTINGS if not args.only or n in args.only.split(",") or n == "uncompressed"]
    base = run_setting("uncompressed", args, None)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"texts": base["texts"], "token_ids": base["token_ids"]}, f)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(args.rounds):  # interleaved: this shared machine's speed drifts from minute to minute
        for name in names:
            rounds[name].append(run_setting(name, args, f.name))
            print(f"  {name}: round {i + 1} of {args.rounds} done", file=sys.stderr)
    os.unlink(f.name)
    results = {name: median_times(runs) for name, runs in rounds.items()}
    b = results["uncompressed"]
    dtype = str(resolve_dtype("auto", "specray", args.device)).removeprefix("torch.")  # the engine's `auto`
    dec = lambda r: r["tokens"] / (r["wall_s"] - r["engine_prefill_s"])  # noqa: E731
    print(f"# compression on {args.device}, {platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"{args.per_task} rows per task, batch {args.batch}, {dtype}; times: median of {args.rounds} interleaved rounds")
    print("| setting | token agr. | exact | caption | vqa | position | ocr | prefill | decode | end-to-end "
          "| weights | peak RSS | acceptance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = []
    for name, r in results.items():
        acc = " | ".join(f"{r['accuracy'][t]:.0%} ({100 * (r['accuracy'][t] - b['accuracy'][t]):+.0f})" for t in TASKS)
        row = {"setting": name, "token_agreement": r["token_agreement"], "exact_agreement": r["exact_agreement"],
               "accuracy": r["accuracy"], "prefill_speedup": b["prefill_s"] / r["prefill_s"],
               "decode_speedup": dec(r) / dec(b), "speedup": (r["tokens"] / r["wall_s"]) / (b["tokens"] / b["wall_s"]),
               "weights_ratio": r["weight_bytes"] / b["weight_bytes"],
               "peak_rss_ratio": r["peak_rss_mb"] / b["peak_rss_mb"],
               "acceptance": r["accepted"] / r["drafted"] if r["drafted"] else None, "raw": {
                   k: v for k, v in r.items() if k not in ("texts", "token_ids")}}
        table.append(row)
        accept = f"{row['acceptance']:.3f}" if row["acceptance"] is not None else "-"
        print(f"| {name} | {row['token_agreement']:.2%} | {row['exact_agreement']:.1%} | {acc} "
              f"| {row['prefill_speedup']:.2f}x | {row['decode_speedup']:.2f}x | {row['speedup']:.2f}x "
              f"| {row['weights_ratio']:.2f} ({r['weight_bytes'] / 2**20:.1f} MiB) "
              f"| {row['peak_rss_ratio']:.2f} ({r['peak_rss_mb']:.0f} MiB) | {accept} |")
    print(f"\nuncompressed: prefill {b['prefill_s']:.2f} s, {dec(b):.0f} decode tok/s, "
          f"{b['tokens'] / b['wall_s']:.0f} tok/s end to end, {b['tokens']} output tokens")
    kern = kernels(args.threads) if args.device == "cpu" else []
    if kern:
        print("\n# the decoder's four linears (qkv, o, gate_up, down) summed; time relative to fp32 (lower is faster)")
        print("| rows | fp32 | bf16 | int8 | int4 (g64) |")
        print("|---|---|---|---|---|")
        for k in kern:
            print(f"| {k['rows']} | {k['fp32_us']:.0f} us (1.00) | {k['bf16_us'] / k['fp32_us']:.2f} "
                  f"| {k['int8_us'] / k['fp32_us']:.2f} | {k['int4_us'] / k['fp32_us']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": table, "kernels": kern, "machine": platform.machine(),
                                               "device": args.device, "per_task": args.per_task}, indent=1))


if __name__ == "__main__":
    main()
