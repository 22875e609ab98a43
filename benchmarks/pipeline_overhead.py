"""How much the pipeline costs: the demo job's tokens/s against its bare backend (`--backend hf|specray`) on the same rows.

    python benchmarks/pipeline_overhead.py [--rows 512] [--batch-size 16] [--threads 2] [--repeats 3]

Both sides do the same work: decode and preprocess every row, then `model.generate` in batches of
--batch-size with the same sampling parameters. The bare side runs it in one process with no Ray (model
load not counted); the job side runs `pipeline.run_job` (Ray Data read -> preprocess -> actor pool ->
parquet). The two alternate, --repeats times each. Prints the job's tokens/s over its whole wall (start-up
included) and in steady state (after its first output row, from metrics.json's timeline), the bare figure,
and the medians' ratios; goal: the job's steady state reaches >= 85% of the bare figure.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TMPDIR", "/tmp/specray-bench-ray")


def bare(shards: list[str], cfg, batch_size: int, threads: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from actors.generate_rows import read_tensors
    from engine.loading import make_engine
    from engine.request import Request
    from pipeline.preprocess import preprocess_row

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    engine = make_engine(cfg.engine(), device="cpu")
    load_s = time.perf_counter() - t0
    params = cfg.sampling()
    tokens = rows = 0
    pending: list[Request] = []
    start = time.perf_counter()
    for shard in shards:
        for r in pq.read_table(shard).to_pylist():
            fields = {k: r[k] for k in ("question", "task", "answer")}
            row = {"shard": "s", "key": r["key"], "image": r["image"], "image_path": None, "fields": fields}
            pre = preprocess_row(row, cfg.engine().target, cfg.task.prompt, cfg.preprocess.max_image_pixels, carry=[])
            rows += 1
            pending.append(Request(key=pre["key"], input_ids=pre["input_ids"],  # the tensors as the actor reads them
                                   model_inputs=read_tensors(pa.array([pre["model_inputs"]]))[0]))
            if len(pending) == batch_size:
                tokens += sum(x.num_output_tokens for x in engine.generate(pending, params))
                pending = []
    if pending:
        tokens += sum(x.num_output_tokens for x in engine.generate(pending, params))
        pending = []
    wall = time.perf_counter() - start
    return {"rows": rows, "output_tokens": tokens, "wall_s": wall, "load_s": load_s, "tokens_per_s": tokens / wall}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows-per-shard", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", choices=["hf", "specray"], default="hf",
                    help="hf: plain model.generate; specray: the demo's engine and VLM drafter (dtype auto)")
    args = ap.parse_args()

    from pipeline.config import load_config
    from pipeline.demo_data import write_demo_data
    from pipeline.job import run_job

    work = Path(tempfile.mkdtemp(prefix="specray-bench-"))
    try:
        shards = write_demo_data(str(work / "shards"), num_samples=args.rows, fmt="parquet",
                                 rows_per_shard=args.rows_per_shard)
        cfg = load_config(ROOT / "configs/demo.yaml", [
            f"input.paths=['{work}/shards/*.parquet']", "input.format=parquet", f"output.path={work}/out",
            f"model.target={ROOT / 'models/target'}", f"resources.batch_size={args.batch_size}",
            f"resources.cpus_per_actor={args.threads}", f"decoding.backend={args.backend}", "output.overwrite=true"]
            + (["model.drafter=null"] if args.backend == "hf" else [f"model.drafter={ROOT / 'models/drafter-vlm'}"]))
        from benchmarks.jobspeed import steady

        bares, walls, steadies = [], [], []
        for rep in range(args.repeats):
            b = bare([s.removeprefix("file://") for s in shards], cfg, args.batch_size, args.threads)
            t0 = time.perf_counter()
            job = run_job(cfg)
            job_wall = time.perf_counter() - t0
            assert job.rows == args.rows and job.errors == 0, (job.rows, job.errors)
            bares.append(b["tokens_per_s"])
            walls.append(job.output_tokens / job_wall)
            steadies.append(steady(job.metrics))
            print(f"[rep {rep + 1}] bare {b['tokens_per_s']:.1f} tok/s; job {walls[-1]:.1f} tok/s over its wall "
                  f"({job_wall:.1f}s), {steadies[-1]:.1f} steady", flush=True)
        med = statistics.median
        print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch threads {args.threads}; "
              f"{args.rows} demo rows, batch {args.batch_size}, model models/target ({args.backend} backend); "
              f"medians of {args.repeats} alternating runs")
        print(f"bare backend, no Ray       : {med(bares):8.1f} tokens/s")
        print(f"job, steady state          : {med(steadies):8.1f} tokens/s  -> ratio {med(steadies) / med(bares):.2f} "
              "(goal >= 0.85)")
        print(f"job, whole wall (start-up) : {med(walls):8.1f} tokens/s  -> ratio {med(walls) / med(bares):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
