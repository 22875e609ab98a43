"""A drafter that learns during the job (model.drafter_training), against the same job without learning.

    python benchmarks/online_drafter.py [--rows 4096] [--fresh-rows 1024] [--weak-steps 40] [--json out.json]

The drafter starts weak on the job's data: the shipped VLM drafter's architecture with its pretrained vision tower
and projector, its decoder re-initialised and trained for `--weak-steps` steps on ground-truth answers (the recipe
trains it 800 steps on the target's own answers: this is a small fraction of it). Then, in one run:
  1. the demo job on `--rows` held-out rows with that drafter, learning off;
  2. the same job, learning on (a trainer actor on the second core; the generate actor has one core either way);
  3. the drafter saved by (2), used from the start of a job on `--fresh-rows` rows of another held-out stream,
     against the weak drafter on the same fresh rows.
Per job: steady tokens/s (after the first output row), wall time, acceptance overall and per quarter of the rows
(metrics.json's timeline), and a digest of the output (the same for every job over the same rows).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.jobspeed import output_hash, run_demo_job, steady  # noqa: E402

DRAFTER = ROOT / "models/drafter-vlm"
LEARN = ["model.drafter_training.enabled=true"]


def weak_drafter(out: Path, steps: int, seed: int = 0) -> Path:
    """The shipped VLM drafter with its decoder re-initialised and trained `steps` steps on ground truth."""
    import torch
    from transformers import AutoModelForImageTextToText

    from engine.processor import load_processor
    from training.train import Batcher, freeze_tower, ground_truth_batches, train_model

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(DRAFTER, dtype=torch.float32)
    decoder = [model.model.language_model, model.lm_head]
    for part in decoder:
        for m in part.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    torch.nn.init.zeros_(m.bias)
    processor = load_processor(str(DRAFTER))
    freeze_tower(model, True)
    if steps:
        train_model(model, ground_truth_batches(Batcher(processor), 32, start=20_000_000), steps, 2e-3,
                    max(1, steps // 10), "weak drafter", log_every=max(1, steps // 4))
    model.requires_grad_(True)
    model.save_pretrained(out)
    for f in DRAFTER.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    return out


def run_job(shards: Path, out: Path, drafter: Path, extra: list[str]) -> dict:
    m = run_demo_job(shards, out, [f"model.drafter={drafter}", "resources.cpus_per_actor=1", *extra])
    return {"steady": steady(m), "wall_s": m["wall_s"], "tokens": m["output_tokens"], "rows": m["rows"],
            "acceptance": m["acceptance_rate"], "quarters": quarters(m), "output_hash": output_hash(out),
            "drafter_training": m.get("drafter_training")}


def quarters(metrics: dict) -> list[float | None]:
    """Acceptance over each quarter of the job's rows (from the cumulative timeline)."""
    line = metrics["timeline"]
    total = metrics["rows"]
    out, prev = [], {"drafted": 0, "accepted": 0}
    for q in range(1, 5):
        point = next((p for p in line if p["rows"] >= q * total / 4), line[-1])
        drafted, accepted = point["drafted"] - prev["drafted"], point["accepted"] - prev["accepted"]
        out.append(accepted / drafted if drafted else None)
        prev = point
    return out


def fmt(q: list[float | None]) -> str:
    return " / ".join("-" if a is None else f"{a:.2f}" for a in q)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--fresh-rows", type=int, default=1024)
    ap.add_argument("--weak-steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=9100, help="demo-data seed of the job (a held-out stream)")
    ap.add_argument("--fresh-seed", type=int, default=9200, help="demo-data seed of the second job's rows")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more overrides for every job")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from pipeline.demo_data import write_demo_data

    work = Path(tempfile.mkdtemp(prefix="specray-online-"))
    results = {}
    try:
        t = time.time()
        weak = weak_drafter(work / "weak", args.weak_steps)
        print(f"weak drafter: {args.weak_steps} steps in {time.time() - t:.0f}s", flush=True)
        write_demo_data(str(work / "rows"), seed=args.seed, num_samples=args.rows, rows_per_shard=128)
        write_demo_data(str(work / "fresh"), seed=args.fresh_seed, num_samples=args.fresh_rows, rows_per_shard=128)
        saved = work / "learned"
        jobs = [("learning off", work / "rows", weak, args.extra),
                ("learning on", work / "rows", weak,
                 [*LEARN, f"model.drafter_training.save_to={saved}", *args.extra]),
                ("fresh rows, weak drafter", work / "fresh", weak, args.extra),
                ("fresh rows, learned drafter", work / "fresh", saved, args.extra)]
        for name, rows, drafter, extra in jobs:
            r = results[name] = run_job(rows, work / "out", drafter, extra)
            print(f"{name:28s} steady {r['steady']:6.1f} tok/s, wall {r['wall_s']:6.1f}s, acceptance "
                  f"{r['acceptance']:.3f} (quarters {fmt(r['quarters'])}), output {r['output_hash']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    off, on = results["learning off"], results["learning on"]
    fresh_weak, fresh_learned = results["fresh rows, weak drafter"], results["fresh rows, learned drafter"]
    trainer = (on["drafter_training"] or {}).get("trainer") or {}
    print(f"\n# {args.rows} held-out demo rows (seed {args.seed}), configs/demo.yaml, 1 CPU for the generate actor, "
          f"a weak VLM drafter ({args.weak_steps} decoder steps); {platform.machine()}, {os.cpu_count()} cores")
    print("| job | steady tok/s | wall | acceptance | acceptance by quarter of the rows |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['steady']:.1f} | {r['wall_s']:.1f}s | {r['acceptance']:.3f} | {fmt(r['quarters'])} |")
    print(f"\nlearning on vs off: steady tokens/s {on['steady'] / off['steady']:.2f}x, wall "
          f"{off['wall_s'] / on['wall_s']:.2f}x faster; acceptance in the last quarter "
          f"{(on['quarters'][-1] or 0) - (off['quarters'][-1] or 0):+.3f} ({fmt(off['quarters'][-1:])} -> "
          f"{fmt(on['quarters'][-1:])}); trainer: {trainer.get('steps')} steps, "
          f"{len(trainer.get('versions') or [])} versions, events {trainer.get('events')}")
    print(f"same output with learning on and off: {on['output_hash'] == off['output_hash']}; "
          f"on fresh rows: {fresh_weak['output_hash'] == fresh_learned['output_hash']}")
    print(f"the learned drafter on fresh rows: acceptance {fresh_learned['acceptance']:.3f} against "
          f"{fresh_weak['acceptance']:.3f} (weak), steady {fresh_learned['steady'] / fresh_weak['steady']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
