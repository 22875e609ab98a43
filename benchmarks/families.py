"""Each VLM family on the specray engine against HF `generate`, in one run, on the same rows.

    python -m benchmarks.families [--rows 16] [--new-tokens 24] [--repeats 3] [--job] [--device cpu|cuda]

For every family of benchmarks/family_models.py (tiny random-weight checkpoints saved with their own processors):
  - which decoder runs it (lean, fallback) or why it is refused;
  - exactness: the engine's greedy output (float32; no drafter and n-gram) against HF `generate` one row at a
    time, rows identical out of rows;
  - speed: tokens/s of HF `generate` (batch 16, left-padded) and of the engine (batch 16), both bfloat16, on the
    same rows, interleaved `--repeats` times; the median of each, and their ratio;
  - with --job: the job through the CLI (`python -m pipeline run`, the family's own saved processor) on the
    specray and the hf backend (float32), rows identical out of rows. Needs Ray.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.family_models import FAMILIES, build_family, sample_images
from engine.config import EngineConfig
from engine.engine import SpecEngine
from engine.hf_backend import HFBackend
from engine.processor import encode, load_processor
from engine.request import Request, SamplingParams, shape_key
from engine.support import check_model

QUESTIONS = ["What is shown?", "Describe the colours.", "Count the shapes.", "Where is the light?"]


def requests_for(path: str, rows: int) -> list[Request]:
    processor = load_processor(path)
    out = []
    for i, image in enumerate(sample_images(rows, seed=11)):
        ids, arrays = encode(processor, QUESTIONS[i % len(QUESTIONS)], image)
        out.append(Request(key=str(i), input_ids=ids, model_inputs=arrays))
    return out


def hf_rows(path: str, requests, params, device) -> list[list[int]]:
    """HF generate one row at a time, float32: the reference."""
    hf = HFBackend(EngineConfig(path, backend="hf", dtype="float32"), device=device)
    return [hf.generate([r], params)[0].text for r in requests]


def timed(fn) -> tuple[float, list]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def speed(path: str, requests, params, device, repeats: int, batch: int) -> dict:
    hf = HFBackend(EngineConfig(path, backend="hf", dtype="bfloat16"), device=device)
    engine = SpecEngine(EngineConfig(path, None, dtype="bfloat16", max_batch_size=batch), device=device)
    runs = {"hf": [], "specray": []}

    groups: dict[tuple, list[Request]] = {}  # one generate per shape of image tensors, as the job's actors group
    for r in requests:
        groups.setdefault(shape_key(r.model_inputs), []).append(r)

    def hf_call():
        return [r for g in groups.values() for i in range(0, len(g), batch) for r in hf.generate(g[i:i + batch], params)]

    calls = {"hf": hf_call, "specray": lambda: engine.generate(requests, params)}
    for name in calls:  # warm-up
        calls[name]()
    for _ in range(repeats):
        for name, call in calls.items():
            s, out = timed(call)
            runs[name].append(sum(r.num_output_tokens for r in out) / s)
    hf_tps, spec_tps = statistics.median(runs["hf"]), statistics.median(runs["specray"])
    return {"hf_tps": hf_tps, "specray_tps": spec_tps, "ratio": spec_tps / hf_tps}


def job(path: str, work: Path, rows: int, new_tokens: int) -> str:
    """The CLI job on both backends (float32); rows identical out of rows."""
    import pyarrow.parquet as pq

    from pipeline.demo_data import write_demo_data

    write_demo_data(str(work / "shards"), num_samples=rows, fmt="webdataset", rows_per_shard=rows)
    texts = {}
    for backend in ("specray", "hf"):
        cfg = {"input": {"paths": [str(work / "shards" / "*.tar")], "format": "webdataset"},
               "task": {"kind": "vqa", "prompt": "{question}"}, "model": {"target": path},
               "decoding": {"backend": backend, "dtype": "float32", "max_new_tokens": new_tokens},
               "output": {"path": str(work / backend)},
               "resources": {"num_actors": 1, "cpus_per_actor": 1, "batch_size": 16}}
        (work / f"{backend}.yaml").write_text(yaml.safe_dump(cfg))
        done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(work / f"{backend}.yaml")],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1][:160]}"
        table = pq.read_table(sorted((work / backend).glob("part-*.parquet")))
        texts[backend] = dict(zip(table.column("key").to_pylist(), table.column("text").to_pylist()))
    same = sum(texts["specray"][k] == texts["hf"].get(k) for k in texts["specray"])
    return f"{same}/{len(texts['specray'])}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--job", action="store_true")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    print(f"# {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, device {args.device}, "
          f"{args.threads} threads; {args.rows} rows, {args.new_tokens} new tokens, batch {args.batch}")
    header = "| family | decoder | exact fp32 (none / n-gram) | HF bf16 tok/s | specray bf16 tok/s | ratio |"
    print(header + (" job specray = hf |" if args.job else ""))
    print("|---" * (header.count("|") - 1 + args.job) + "|")
    exact_families, refused = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            path = str(build_family(family, Path(tmp) / family))
            try:
                plan = check_model(path)
            except ValueError as e:
                print(f"| {family} | refused: {str(e).split(': ', 1)[1][:110]} | | | | |" + (" |" if args.job else ""))
                refused.append(family)
                continue
            requests = requests_for(path, args.rows)
            ref = hf_rows(path, requests, params, args.device)
            exact = []
            for drafter in (None, "ngram"):
                engine = SpecEngine(EngineConfig(path, drafter, dtype="float32", max_batch_size=args.batch),
                                    device=args.device)
                got = [r.text for r in engine.generate(requests, params)]
                exact.append(f"{sum(a == b for a, b in zip(got, ref))}/{len(ref)}")
            if all(e == f"{len(ref)}/{len(ref)}" for e in exact):
                exact_families.append(family)
            s = speed(path, requests, params, args.device, args.repeats, args.batch)
            line = (f"| {family} | {plan.kind} ({plan.reason}) | {' / '.join(exact)} | {s['hf_tps']:.1f} | "
                    f"{s['specray_tps']:.1f} | **{s['ratio']:.2f}x** |")
            if args.job:
                line += f" {job(path, Path(tmp) / f'{family}-job', args.rows, args.new_tokens)} |"
            print(line, flush=True)
    print(f"\n{len(exact_families)} exact ({', '.join(exact_families)}); {len(refused)} refused "
          f"({', '.join(refused)}); {len(args.families) - len(exact_families) - len(refused)} neither")


if __name__ == "__main__":
    main()
