"""The speed a user's job gets: the demo job, end to end, on each backend and drafter, in one run.

    python benchmarks/jobspeed.py [--rows 1024] [--repeats 3] [--only NAME,NAME] [--json out.json]
    python benchmarks/jobspeed.py --only "4 actors input order,4 actors any order"   # head-of-line blocking

Rows: `--rows` demo rows from a held-out seed (WebDataset shards of 128 rows). Each variant runs the demo config
as a user does (`python -m pipeline run configs/demo.yaml --set ...`, a fresh process and a fresh local Ray), so
start-up is counted where it falls. Variants run interleaved (variant order rotates each repetition) and each
figure is the median over the repetitions. Per variant, from the job's own metrics.json:
  - steady tokens/s: output tokens after the first output row over the time after it (the timeline);
  - first row: seconds from the job's start to the first output row, and where they went (startup phases);
  - wall: the job's whole time; tokens/s over the wall.
Ratios: steady tokens/s against the hf backend at its best dtype (the faster of fp32 and bf16 here) and against
specray without a drafter, all measured in the same run.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> --set overrides on configs/demo.yaml
    "hf fp32": ["decoding.backend=hf", "decoding.dtype=float32", "model.drafter=null"],
    "hf bf16": ["decoding.backend=hf", "decoding.dtype=bfloat16", "model.drafter=null"],
    "specray plain": ["model.drafter=null"],
    "specray vlm": [f"model.drafter={ROOT / 'models/drafter-vlm'}"],
    "specray text": [f"model.drafter={ROOT / 'models/drafter-text'}"],
    "specray ngram": ["model.drafter=ngram"],
    # head-of-line blocking: 4 actors on fractional CPUs, small uneven batches, shards committed in input order
    # (the driver waits for the slowest batch ahead) or in any order (a shard as soon as its rows are out)
    "4 actors input order": [f"model.drafter={ROOT / 'models/drafter-vlm'}", "resources.num_actors=4",
                             "resources.cpus_per_actor=0.5", "resources.batch_size=16", "output.commit_order=input"],
    "4 actors any order": [f"model.drafter={ROOT / 'models/drafter-vlm'}", "resources.num_actors=4",
                           "resources.cpus_per_actor=0.5", "resources.batch_size=16", "output.commit_order=any"],
}
DEFAULT = list(VARIANTS)[:6]  # the commit-order pair runs with --only


def steady(metrics: dict) -> float:
    """Output tokens after the first output row, over the time after it (metrics.json's timeline)."""
    line = [p for p in metrics["timeline"] if p["rows"] > 0]
    if len(line) < 2:
        return metrics["tokens_per_s"]
    first, last = line[0], line[-1]
    return (last["output_tokens"] - first["output_tokens"]) / max(1e-9, last["t"] - first["t"])


def run_demo_job(shards: Path, out: Path, sets: list[str]) -> dict:
    """`python -m pipeline run configs/demo.yaml` on `shards` into `out` (emptied first) with `sets`, as a user
    runs it (a fresh process and a fresh local Ray); returns its metrics.json."""
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"input.paths=['{shards}/*.tar']", f"output.path={out}", f"model.target={ROOT / 'models/target'}", *sets]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=os.environ.get("RAY_TMPDIR", "/tmp/sr-jobspeed"),
               HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline", "run", str(ROOT / "configs/demo.yaml")]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}\n{done.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


def run_variant(name: str, shards: Path, out: Path, extra: list[str]) -> dict:
    t = time.perf_counter()
    m = run_demo_job(shards, out, [*VARIANTS[name], *extra])
    st = m.get("startup") or {}
    commits = [c["t"] for c in m.get("commits", [])]
    return {"steady": steady(m), "first_row_s": st.get("first_row_s"), "wall_s": m["wall_s"],
            "mean_commit_s": sum(commits) / len(commits) if commits else None,
            "process_s": time.perf_counter() - t, "tokens": m["output_tokens"], "rows": m["rows"],
            "acceptance": m.get("acceptance_rate"), "startup": st,
            "output_hash": output_hash(out)}


def output_hash(out: Path) -> str:
    """A digest of the job's (key, text) pairs, to see which variants wrote the same output."""
    import hashlib

    import pyarrow.parquet as pq

    pairs = sorted((r["key"], r["text"]) for p in out.glob("part-*.parquet")
                   for r in pq.read_table(p, columns=["key", "text"]).to_pylist())
    return hashlib.sha1(json.dumps(pairs).encode()).hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=9000, help="demo-data seed (a held-out stream)")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more overrides for every variant")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = args.only.split(",") if args.only else DEFAULT

    sys.path.insert(0, str(ROOT))
    from pipeline.demo_data import write_demo_data

    work = Path(tempfile.mkdtemp(prefix="specray-jobspeed-"))
    try:
        write_demo_data(str(work / "shards"), seed=args.seed, num_samples=args.rows, fmt="webdataset",
                        rows_per_shard=128)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                r = run_variant(name, work / "shards", work / "out", args.extra)
                runs[name].append(r)
                print(f"[rep {rep + 1}] {name:14s} steady {r['steady']:7.1f} tok/s, first row {r['first_row_s']:.1f}s, "
                      f"wall {r['wall_s']:.1f}s, {r['tokens']} tokens", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("steady", "first_row_s", "wall_s", "mean_commit_s")}
           for n, rs in runs.items()}
    hf = [n for n in ("hf fp32", "hf bf16") if n in med]
    best_hf = max(hf, key=lambda n: med[n]["steady"]) if hf else None
    plain = med.get("specray plain")
    print(f"\n# {args.rows} demo rows (seed {args.seed}), configs/demo.yaml; {platform.machine()}, {os.cpu_count()} "
          f"cores; median of {args.repeats} interleaved runs; steady = tokens/s after the first output row")
    print(f"| variant | steady tok/s | vs {best_hf or 'hf'} | vs specray plain | first row | wall | mean shard commit "
          f"| acceptance |")
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        m, acc = med[n], [r["acceptance"] for r in runs[n] if r["acceptance"] is not None]
        vs_hf = f"{m['steady'] / med[best_hf]['steady']:.2f}x" if best_hf else "-"
        vs_plain = f"{m['steady'] / plain['steady']:.2f}x" if plain else "-"
        accepted = f"{statistics.median(acc):.1%}" if acc else "-"
        print(f"| {n} | {m['steady']:.1f} | {vs_hf} | {vs_plain} | {m['first_row_s']:.1f}s | {m['wall_s']:.1f}s | "
              f"{m['mean_commit_s']:.1f}s | {accepted} |")
    same = {}
    for n in names:
        for r in runs[n]:
            same.setdefault(r["output_hash"], set()).add(n)
    print("\noutputs (digest of key, text): " + "; ".join(f"{h}: {', '.join(sorted(v))}" for h, v in same.items()))
    first = runs[names[0]][-1]["startup"]
    print("\nstart-up of the last run of", names[0], {k: round(v, 2) if isinstance(v, float) else v
                                                     for k, v in first.items()})
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "median": med}, indent=1, default=str))


if __name__ == "__main__":
    main()
