"""How soon a first row can come at all on this machine: the demo job's first row against the same work done in one
bare process, both started cold.

    python benchmarks/startup_floor.py [--repeats 3] [--rows 64] [--rows-per-shard 32]

The job: `python -m pipeline run configs/demo.yaml` on demo shards (parquet), its first row and phases from its
metrics.json (counted from the command's start, as a user sees them). The floor: a fresh Python process that
does only what a first row needs, with no Ray: import torch and transformers, load the demo config's engine (target,
VLM drafter, the load-time parity check), read the first shard, preprocess the first batch's rows and generate them.
It runs with the first batch the demo config's size (`resources.batch_size`) and with one of 8 rows. Each variant
runs `--repeats` times, interleaved; medians. Nothing here is cached between runs but what the OS caches.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BARE = r"""
import time
T0 = time.time()
import json, sys
sys.path.insert(0, sys.argv[1])
marks = {}
import torch, transformers
import pyarrow.parquet as pq
torch.set_num_threads(int(sys.argv[4]))
marks["imports_s"] = time.time() - T0
from pipeline.config import load_config
from engine.loading import make_engine
cfg = load_config(sys.argv[1] + "/configs/demo.yaml", [f"model.target={sys.argv[1]}/models/target",
                  f"model.drafter={sys.argv[1]}/models/drafter-vlm"])
engine = make_engine(cfg.engine(), device="cpu")
marks["model_load_s"] = time.time() - T0 - marks["imports_s"]
from actors.generate_rows import read_tensors
from engine.request import Request
from pipeline.preprocess import preprocess_row
import pyarrow as pa
t = time.time()
rows = pq.read_table(sys.argv[2]).to_pylist()[:int(sys.argv[3])]
requests = []
for r in rows:
    row = {"shard": "s", "key": r["key"], "image": r["image"], "image_path": None,
           "fields": {k: r[k] for k in ("question", "task", "answer")}}
    pre = preprocess_row(row, cfg.engine().target, cfg.task.prompt, cfg.preprocess.max_image_pixels, carry=[])
    requests.append(Request(key=pre["key"], input_ids=pre["input_ids"],
                            model_inputs=read_tensors(pa.array([pre["model_inputs"]]))[0]))
marks["preprocess_s"] = time.time() - t
t = time.time()
out = engine.generate(requests, cfg.sampling())
marks["first_batch_s"] = time.time() - t
marks["first_row_s"] = time.time() - T0
assert all(r.error is None for r in out)
print(json.dumps(marks))
"""

ENV = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def bare(shard: str, rows: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", BARE, str(ROOT), shard, str(rows), str(threads)], check=True,
                         capture_output=True, text=True, env={**os.environ, **ENV})
    return json.loads(out.stdout.strip().splitlines()[-1])


def job(work: Path, shards: str, ray_tmp: str) -> dict:
    out = work / "out"
    subprocess.run([sys.executable, "-m", "pipeline", "run", str(ROOT / "configs/demo.yaml"), "--overwrite",
                    "--set", f"input.paths=['{shards}']", "--set", "input.format=parquet",
                    "--set", f"output.path={out}", "--set", f"model.target={ROOT / 'models/target'}",
                    "--set", f"model.drafter={ROOT / 'models/drafter-vlm'}"],
                   check=True, capture_output=True, text=True, cwd=ROOT,
                   env={**os.environ, **ENV, "RAY_TMPDIR": ray_tmp})
    startup = json.loads((out / "metrics.json").read_text())["startup"]
    return {k: startup[k] for k in ("first_row_s", "driver_s", "ray_s", "actor_start_s", "imports_s",
                                    "model_load_s", "wait_first_batch_s", "first_batch_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rows-per-shard", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="the bare process's torch threads (the demo actor's)")
    args = ap.parse_args()
    from pipeline.config import load_config
    from pipeline.demo_data import write_demo_data

    batch = load_config(ROOT / "configs/demo.yaml", []).resources.batch_size
    work = Path(tempfile.mkdtemp(prefix="specray-floor-"))
    try:
        shards = [s.removeprefix("file://") for s in write_demo_data(
            str(work / "shards"), num_samples=args.rows, fmt="parquet", rows_per_shard=args.rows_per_shard)]
        first = min(batch, args.rows_per_shard)
        variants = {"job (make demo)": lambda: job(work, f"{work}/shards/*.parquet", "/tmp/specray-floor-ray"),
                    f"bare, first batch {first} rows": lambda: bare(shards[0], first, args.threads),
                    "bare, first batch 8 rows": lambda: bare(shards[0], 8, args.threads)}
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for rep in range(args.repeats):
            for label, fn in variants.items():
                runs[label].append(fn())
                print(f"[rep {rep + 1}] {label}: first row {runs[label][-1]['first_row_s']:.1f}s", flush=True)
        print(f"machine: {platform.machine()} {os.cpu_count()} cores; {args.rows} demo rows in "
              f"{args.rows_per_shard}-row shards, the demo config (batch {batch}); medians of {args.repeats} "
              "interleaved cold runs, seconds from the process's start")
        for label, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            phases = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}" for k, v in med.items()
                               if k != "first_row_s")
            print(f"{label:28} first row {med['first_row_s']:5.1f}s  ({phases})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
