"""Disaggregated drafting: drafter servers in other actors, channels that fail over, and the pools of a job."""
from __future__ import annotations

import json
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray
import torch

from engine.config import EngineConfig
from engine.draft_length import DraftLength
from engine.engine import SpecEngine
from actors.drafter_channel import DrafterChannel
from actors.drafter_server import DrafterServer
from engine.request import SamplingParams
from tests.conftest import ROOT
from pipeline.demo_data import write_demo_data
from engine.processor import load_processor
from training.heldout import heldout_requests

TARGET = str(ROOT / "models/target")
DRAFTER = str(ROOT / "models/drafter-vlm")
GREEDY = SamplingParams(max_new_tokens=64)


@pytest.fixture(scope="module")
def prompts():
    return heldout_requests(load_processor(TARGET), 64)  # the rows of the demo shards below


@pytest.fixture(scope="module")
def colocated(prompts):
    """The reference: the same engine with its drafter in-process (float32 target; greedy)."""
    torch.set_num_threads(2)
    engine = SpecEngine(EngineConfig(TARGET, DRAFTER, dtype="float32", max_batch_size=16, num_draft_tokens=4))
    return engine.generate(prompts, GREEDY)


def _servers(n: int):
    server = ray.remote(DrafterServer).options(num_cpus=0.5, max_restarts=0)
    handles = [server.remote(EngineConfig(TARGET, DRAFTER, threads=1)) for _ in range(n)]
    ray.get([h.ping.remote() for h in handles])
    return [(f"drafter-{i}", h) for i, h in enumerate(handles)]


def test_remote_drafters_in_two_groups_give_the_colocated_output(ray_address, prompts, colocated):
    """Two groups per target, each drafting on its own server actor, verified alternately: the output is the
    co-located engine's, token for token; drafting actually overlapped verification."""
    servers = _servers(2)
    engine = SpecEngine(EngineConfig(TARGET, None, dtype="float32", max_batch_size=16))
    channels = [DrafterChannel(f"t/{g}", (lambda g=g: [servers[g]])) for g in range(2)]
    results = engine.generate(prompts, GREEDY, drafters=channels, policy=DraftLength(4))
    assert [r.token_ids for r in results] == [r.token_ids for r in colocated]
    stats = engine.stats.as_dict()
    assert stats["accepted"] > 0.4 * stats["drafted"] > 0
    assert 0 < stats["overlap"] <= 1 and stats["wait_s"] < stats["draft_s"]
    assert all(ray.get(h.active_channels.remote()) == 2 - 1 for _, h in servers)  # one channel each, kept
    for c in channels:
        c.close()
    for _, h in servers:
        ray.kill(h)


def test_a_killed_drafter_is_replaced_and_with_none_left_decoding_goes_on(ray_address, prompts, colocated):
    """A server dies mid-generation: the group replays its rows on the other server; when that one dies too,
    the group decodes without drafts. Either way the output is unchanged and no row is lost."""
    servers = _servers(2)
    engine = SpecEngine(EngineConfig(TARGET, None, dtype="float32", max_batch_size=16))
    calls = {"n": 0}

    def assigned():
        calls["n"] += 1
        if calls["n"] == 6:
            ray.kill(servers[0][1])
        if calls["n"] == 12:
            ray.kill(servers[1][1])
        return servers

    channel = DrafterChannel("t/0", assigned)
    results = engine.generate(prompts, GREEDY, drafters=[channel], policy=DraftLength(4))
    assert [r.token_ids for r in results] == [r.token_ids for r in colocated]
    assert channel.failovers >= 2 and channel.dead == {"drafter-0", "drafter-1"}
    # speculation went on after the first loss, and decoding for many rounds after the second
    assert sum(r.num_accepted_tokens for r in results) > 0 and calls["n"] > 12 + 5


def _job_config(tmp_path, shards, **autoscaler) -> dict:
    return {
        "input": {"paths": [f"{shards}/*.tar"], "format": "webdataset"},
        "task": {"kind": "vqa", "prompt": "{question}"},
        "model": {"target": TARGET, "drafter": DRAFTER},
        "decoding": {"dtype": "float32", "max_batch_size": 8},
        "output": {"path": str(tmp_path / "out")},
        # half a CPU per target: with 2 targets, 2 drafters and the routers, a whole CPU stays free for Ray Data's
        # read tasks (they ask for one), which would otherwise starve once the plan grows mid-read
        "resources": {"mode": "disaggregated", "cpus_per_actor": 0.5, "batch_size": 8},
        "autoscaler": {"devices": 2, "drafter_cost": 0.5, "drafter_cpus": 0.5, "interval_s": 1.0, **autoscaler},
    }


def test_pools_scale_up_and_down_mid_job_without_losing_or_repeating_a_row(tmp_path, ray_address, prompts,
                                                                          colocated):
    """A job whose plan changes while it runs: 1 target + 1 drafter, then 2 targets + 2 drafters... down to one
    target decoding plainly, and back. Drained actors finish their work first; every row comes out once, with
    the text of the co-located run."""
    from pipeline.job import run_job

    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=64, fmt="webdataset", rows_per_shard=16)
    cfg = _job_config(tmp_path, shards, policy="fixed", targets=1, drafters=1, k=3, devices=3)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(r=run_job(cfg)))
    job.start()
    manager = None
    while manager is None and job.is_alive():
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("specray-pools-")]
        manager = ray.get_actor(names[0], namespace=ray.get_runtime_context().namespace) if names else None
        time.sleep(0.2)
    plans = [(2, 2, 3), (1, 0, 0), (1, 2, 5)]
    seen = []
    for targets, drafters, k in plans:
        while job.is_alive():
            actors = ray.get(manager.actors.remote())
            done = sum(a["batches"] for a in actors["targets"].values())
            if done >= 2 * (len(seen) + 1):
                break
            time.sleep(0.2)
        if not job.is_alive():
            break
        ray.get(manager.set_plan.remote(targets, drafters, k))
        seen.append((targets, drafters, k))
    job.join()
    assert len(seen) >= 2, "the job ended before the plan could change"
    out = [r for f in sorted((tmp_path / "out").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    keys = [r["key"] for r in out]
    assert len(keys) == 64 and len(set(keys)) == 64
    assert all(r["error"] is None for r in out)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    events = metrics["pools"]["events"]
    assert any(e["event"] == "drain" for e in events) and any(e["event"] == "start" and "target" in e["actor"]
                                                              for e in events[1:])
    assert sum(e["event"] == "start" and e["actor"].startswith("target") for e in events) >= 2

    expected = {p.key: r.text for p, r in zip(prompts, colocated)}
    assert {r["key"]: r["text"] for r in out} == expected


def test_nodes_removed_mid_job_from_a_simulated_cluster(tmp_path, prompts, colocated):
    """On a ray.cluster_utils.Cluster (its own Ray, in a subprocess): the node of a busy target actor is removed,
    then the drafter's node. The batch in flight is redone on the other target, the channels lose their drafter
    and decode plainly: every row comes out once, with the co-located text, and the job ends cleanly."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run.json"
    env = dict(os.environ, RAY_TMPDIR="/tmp/specray-test-cluster")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/disaggregated_run.py"), "--rows", "32", "--devices", "3",
         "--modes", "disaggregated", "--nodes", "target_node:1,target_node:1,drafter_node:1", "--fixed", "2,1,3",
         "--remove", "target@1,drafter@3", "--dtype", "float32", "--batch-size", "8", "--max-batch", "8",
         "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(out.read_text())["disaggregated"]
    assert len(run["removed"]) == 2, run["removed"]
    expected = {p.key: r.text for p, r in zip(prompts[:32], colocated[:32])}
    assert run["rows"] == expected
    assert [r.split()[0] for r in run["removed"]] == ["target", "drafter"]
    lost = [e["actor"] for e in run["pools"]["events"] if e["event"] == "lost"]
    assert any(a.startswith("target") for a in lost)  # (a lost drafter is noticed by its channels first)
