"""Peak memory of a job against its size: the demo job on 2k and on 20k rows, in one run.

    python benchmarks/memory.py [--small 2000] [--large 20000] [--max-new-tokens 4] [--rows-per-shard 256]

Each job runs as `python -m pipeline run configs/demo.yaml` in its own process with its own local Ray; the
resident memory of that process and all its descendants (driver, Ray's daemons, read/preprocess workers, the
generate actor) is sampled every 0.25 s. Prints the peak of the driver alone and of the whole tree for both
sizes, and their ratio (the goal: the 20k-row job peaks at most 1.2x the 2k-row one: memory must not grow
with the input, since shards stream through and are committed one by one).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(the process's RSS, the RSS of it and every descendant)."""
    try:
        own = proc.memory_info().rss
        total = own
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return own, total
    except psutil.Error:
        return 0, 0


def run_job(rows: int, args, work: Path) -> dict:
    from pipeline.demo_data import write_demo_data

    shards = work / f"in-{rows}"
    write_demo_data(str(shards), num_samples=rows, rows_per_shard=args.rows_per_shard)
    out = work / f"out-{rows}"
    cmd = [sys.executable, "-m", "pipeline", "run", str(ROOT / "configs/demo.yaml"), "--overwrite",
           "--set", f"input.paths=['{shards}/*.tar']", "--set", f"output.path={out}",
           "--set", f"decoding.max_new_tokens={args.max_new_tokens}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rm", dir="/tmp")
    t0 = time.time()
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(job.pid)
    peak = {"driver": 0, "tree": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            own, total = tree_rss(proc)
            peak["driver"], peak["tree"] = max(peak["driver"], own), max(peak["tree"], total)
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = job.communicate()
    stop.set()
    sampler.join()
    if job.returncode:
        raise RuntimeError(f"the {rows}-row job failed:\n{stderr[-3000:]}")
    return {"rows": rows, "wall_s": time.time() - t0, "driver_mb": peak["driver"] / 2**20,
            "tree_mb": peak["tree"] / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--rows-per-shard", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="specray-mem-") as tmp:
        small = run_job(args.small, args, Path(tmp))
        large = run_job(args.large, args, Path(tmp))
    print(f"# peak memory of the demo job by size ({platform.machine()}, {os.cpu_count()} cores; "
          f"max_new_tokens {args.max_new_tokens}, {args.rows_per_shard} rows per shard)")
    print("| rows | wall | driver peak RSS | whole process tree peak RSS |")
    print("|---|---|---|---|")
    for r in (small, large):
        print(f"| {r['rows']} | {r['wall_s']:.0f} s | {r['driver_mb']:.0f} MiB | {r['tree_mb']:.0f} MiB |")
    print(f"| ratio | | {large['driver_mb'] / small['driver_mb']:.2f}x | {large['tree_mb'] / small['tree_mb']:.2f}x |")


if __name__ == "__main__":
    main()
