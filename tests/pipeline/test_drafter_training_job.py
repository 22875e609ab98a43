"""model.drafter_training through the job: the same rows as without learning, the drafter versions on record,
the learned drafter saved where the next job loads it; and a trainer killed mid-job costs no row."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForImageTextToText

from pipeline.config import ConfigError, load_config
from pipeline.demo_data import write_demo_data
from tests.conftest import ROOT, run_cli
from tests.pipeline.test_operations import _keys, _run_in_background, _wait_for

LEARN = ["model.drafter_training.enabled=true", "model.drafter_training.batch_size=4",
         "model.drafter_training.publish_every=1", "model.drafter_training.cpus=1"]


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"input.paths=['{shards}/*.tar']", f"output.path={out}", "decoding.dtype=float32",
            f"model.target={ROOT / 'models/target'}", f"model.drafter={ROOT / 'models/drafter-vlm'}",
            "decoding.max_new_tokens=24", "resources.cpus_per_actor=1", "resources.batch_size=8", *extra]
    return ["run", str(ROOT / "configs/demo.yaml"), *[a for s in sets for a in ("--set", s)]]


def _texts(out: Path) -> dict[str, str]:
    rows = [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    return {r["key"]: r["text"] for r in rows}


def test_a_learning_drafter_changes_no_row_and_is_saved_for_the_next_job(tmp_path, ray_address):
    """Learning on, then the next job (learning off) drafting with the drafter it saved: the same rows, token for
    token (both are the target's greedy output), and the versions on record."""
    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=64, rows_per_shard=16)
    out = tmp_path / "out-on"
    done = run_cli(*_args(shards, out, *LEARN), address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    texts = _texts(out)
    assert len(texts) == 64

    metrics = json.loads((out / "metrics.json").read_text())
    learned = metrics["drafter_training"]
    trainer = learned["trainer"]
    assert trainer["steps"] >= 1 and trainer["versions"] and trainer["events"] == []
    assert [v["version"] for v in trainer["versions"]] == list(range(1, len(trainer["versions"]) + 1))
    by_version = learned["by_version"]
    assert sum(v["rows"] for v in by_version) == 64 and by_version[0]["version"] == 0
    assert len(by_version) >= 2, by_version  # later batches were drafted by a published version
    assert all(v["drafted"] >= v["accepted"] >= 0 for v in by_version)
    assert sum(v["drafted"] for v in by_version[1:]) > 0  # a new version is measured, even where drafting did not pay

    saved = out / "drafter"
    assert trainer["saved_to"] == str(saved) and (saved / "model.safetensors").exists()
    original = AutoModelForImageTextToText.from_pretrained(ROOT / "models/drafter-vlm")
    learned_model = AutoModelForImageTextToText.from_pretrained(saved)
    changed = [n for n, p in learned_model.state_dict().items() if not p.equal(original.state_dict()[n].to(p.dtype))]
    assert changed, "the saved drafter is the original"
    # the next job drafts with it (model.drafter: the saved folder; learning off): the same rows
    out = tmp_path / "out-next"
    done = run_cli(*_args(shards, out, f"model.drafter={saved}"), address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _texts(out) == texts
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["drafter_training"] is None and metrics["acceptance_rate"] > 0.5


def _trainer_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("DrafterTrainer" in part for part in (p.info["cmdline"] or []))]


def test_a_trainer_killed_mid_job_loses_no_row(tmp_path, ray_address):
    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=96, rows_per_shard=8)
    out = tmp_path / "out"
    job = _run_in_background(_args(shards, out, *LEARN), ray_address)
    _wait_for(lambda: (out / "drafter/model.safetensors").exists() or job.poll() is not None, 300,
              "a published drafter version")
    pids = _trainer_pids()
    assert job.poll() is None and pids, "no trainer to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    keys = _keys(out)
    assert len(keys) == 96 and len(set(keys)) == 96
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["errors"] == 0
    events = metrics["drafter_training"]["trainer"]["events"]
    assert any("trainer lost" in e for e in events), events
    assert (out / "drafter/model.safetensors").exists()  # its last published version stays


@pytest.mark.parametrize("sets, field", [
    (["model.drafter=ngram"], "model.drafter_training"),
    (["model.drafter=null"], "model.drafter_training"),
    (["decoding.backend=hf", "model.drafter=null"], "model.drafter_training"),
    (["model.drafter_training.learning_rate=0"], "model.drafter_training.learning_rate"),
])
def test_a_drafter_training_config_that_cannot_work_is_refused(sets, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs/demo.yaml", ["model.drafter_training.enabled=true", *sets])
