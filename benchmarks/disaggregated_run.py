"""A real run of the pools on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster) on this machine.

    python benchmarks/disaggregated_run.py [--rows 256] [--devices 2] [--modes colocated,disaggregated]
                                           [--remove target@2,drafter@4] [--json out.json]

The cluster: a head node (the driver, Ray Data's read and preprocess, the routers), and worker nodes labelled
with custom resources: `target_node` nodes for target actors and a `drafter_node` node for drafter actors
(--nodes). The same demo rows run co-located (a Ray Data actor pool of `devices` engines, each with its own
drafter) and disaggregated (the controller sizes target and drafter pools within `devices`; a target and a
drafter take one device each here, since each is one CPU thread). Printed: rows/s and tokens/s of each mode in
the same run, excluding actor start-up (the rows after the first output batch, over the time from it to the
last; outputs are not kept in order), their ratio, whether the
disaggregated greedy output is identical to the co-located one, the plan the controller chose, and the overlap
of drafting with verification it measured. `--remove KIND@N` removes the node of the first KIND actor once N
batches are done (a fault test; tests/actors/test_pools.py runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipeline.demo_data import write_demo_data  # noqa: E402
from pipeline.stages import generate_stages, start_pools  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.read import read_shards  # noqa: E402
from pipeline.shards import list_shards  # noqa: E402


def config(shards: str, mode: str, args) -> dict:
    return {
        "input": {"paths": [f"{shards}/*.tar"], "format": "webdataset"},
        "task": {"kind": "vqa", "prompt": "{question}"},
        "model": {"target": str(ROOT / "models/target"), "drafter": str(ROOT / "models/drafter-vlm")},
        "decoding": {"dtype": args.dtype, "max_batch_size": args.max_batch},
        "output": {"path": "unused"},
        "resources": {"mode": mode, "num_actors": int(args.devices), "cpus_per_actor": 1,
                      "batch_size": args.batch_size},
        "autoscaler": {"devices": args.devices, "drafter_cost": 1.0, "drafter_cpus": 1, "interval_s": args.interval,
                       "target_resources": {"target_node": 1}, "drafter_resources": {"drafter_node": 1},
                       "max_drafters": 4, **({"policy": "fixed", "targets": args.fixed[0], "drafters": args.fixed[1],
                                              "k": args.fixed[2]} if args.fixed else {})},
    }


def run(cfg_dict: dict, cluster: Cluster, nodes: dict, remove: list[tuple[str, int]]) -> dict:
    cfg = load_config(cfg_dict)
    shards = list_shards(cfg.input)
    ds, normalise = read_shards(cfg.input, shards)
    pools = start_pools(cfg) if cfg.resources.mode == "disaggregated" else None
    removed: list[str] = []
    stop = threading.Event()

    def remover() -> None:  # remove a node once enough batches are done
        todo = list(remove)
        while todo and not stop.wait(0.2):
            kind, after = todo[0]
            actors = ray.get(pools.actors.remote())
            done = sum(a["batches"] for a in actors["targets"].values())
            if done < after:
                continue
            pool = actors["targets" if kind == "target" else "drafters"]
            ready = [i for i, a in pool.items() if a["ready"]]
            if not ready:
                continue
            node_id = ray.get(pools.node_of.remote(ready[0]))
            node = next((n for n in nodes.values() if n.node_id == node_id), None)
            if node is None:  # the actor sits on the head node: nothing to remove
                todo.pop(0)
                continue
            cluster.remove_node(node)
            removed.append(f"{kind} {ready[0]} ({next(k for k, n in nodes.items() if n is node)})")
            nodes.pop(next(k for k, n in nodes.items() if n is node))
            todo.pop(0)

    watcher = threading.Thread(target=remover, daemon=True)
    if remove:
        watcher.start()
    t0 = time.time()
    first = None
    rows: dict[str, str] = {}
    tokens = steady_tokens = steady_rows = 0
    try:
        for batch in generate_stages(ds, cfg, normalise, pools).iter_batches(batch_size=None,
                                                                              batch_format="pyarrow"):
            if first is None:
                first = time.time()
            else:
                steady_tokens += sum(batch.column("num_output_tokens").to_pylist())
                steady_rows += batch.num_rows
            for r in batch.to_pylist():
                if r["key"] in rows:
                    raise RuntimeError(f"row {r['key']} came out twice")
                rows[r["key"]] = r["text"] if r["error"] is None else f"ERROR {r['error']}"
                tokens += r["num_output_tokens"]
    finally:
        stop.set()
        report = ray.get(pools.shutdown.remote()) if pools is not None else None
    end = time.time()
    steady = end - first
    return {"rows": rows, "tokens": tokens, "wall_s": end - t0, "steady_s": steady,
            "tokens_per_s": steady_tokens / steady if steady > 0 else 0.0,
            "rows_per_s": steady_rows / steady if steady > 0 else 0.0, "pools": report, "removed": removed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--devices", type=float, default=2)
    ap.add_argument("--modes", default="colocated,disaggregated")
    ap.add_argument("--nodes", default="target_node:2,drafter_node:2",
                    help="worker nodes: RESOURCE:COUNT, one node per entry, each with COUNT units of RESOURCE")
    ap.add_argument("--remove", default="", help="KIND@N,...: remove the node of a KIND (target|drafter) actor "
                                                 "after N batches")
    ap.add_argument("--fixed", default="", help="T,D,K: a fixed plan instead of the controller")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--interval", type=float, default=3.0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    args.fixed = [int(x) for x in args.fixed.split(",")] if args.fixed else None
    remove = [(k, int(n)) for k, n in (x.split("@") for x in args.remove.split(",") if x)]

    tmp = tempfile.mkdtemp(prefix="specray-cluster-")
    os.environ.setdefault("RAY_TMPDIR", "/tmp/srcl")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes = {}
    for i, spec in enumerate(x for x in args.nodes.split(",") if x):
        name, count = spec.split(":")
        # a CPU more than the labelled units, for Ray Data's small tasks (routers, preprocessing) placed there
        nodes[f"{name}-{i}"] = cluster.add_node(num_cpus=int(count) + 1, resources={name: int(count)})
    ray.init(address=cluster.address, log_to_driver=False)
    write_demo_data(f"{tmp}/shards", num_samples=args.rows, fmt="webdataset", rows_per_shard=32)
    out = {"machine": f"{os.cpu_count()} CPU cores", "rows": args.rows, "devices": args.devices,
           "nodes": args.nodes}
    for mode in args.modes.split(","):
        res = run(config(f"{tmp}/shards", mode, args), cluster, nodes, remove if mode == "disaggregated" else [])
        out[mode] = res
        p = res["pools"]
        print(f"{mode:>14}: {res['tokens_per_s']:7.1f} tokens/s, {res['rows_per_s']:5.2f} rows/s "
              f"({len(res['rows'])} rows, {res['tokens']} tokens, {res['steady_s']:.1f} s after the first row, "
              f"{res['wall_s']:.1f} s in all)", flush=True)
        if p:
            print(f"{'':>14}  plan {p['plan']}, overlap {p['overlap']}, acceptance {p['acceptance']}, "
                  f"failovers {p['failovers']}", flush=True)
            for d in p["decisions"]:
                print(f"{'':>14}  decision t={d['t']}s: {d['mode']} {d['targets']} targets, {d['drafters']} drafters, "
                      f"k={d['k']} ({d['reason']})", flush=True)
        if res["removed"]:
            print(f"{'':>14}  removed: {', '.join(res['removed'])}", flush=True)
    if "colocated" in out and "disaggregated" in out:
        a, b = out["colocated"], out["disaggregated"]
        print(f"disaggregated / colocated: {b['tokens_per_s'] / a['tokens_per_s']:.2f}x tokens/s; "
              f"greedy output identical: {a['rows'] == b['rows']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
