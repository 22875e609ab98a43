"""Compression as a job sees it: config errors that name the field, and metrics.json's compression section with the
measured agreement against the uncompressed target (the engine's side is tests/engine/test_compression.py)."""
from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.demo_data import write_demo_data
from tests.conftest import ROOT, run_cli

TARGET = str(ROOT / "models/target")


def test_compression_config_errors_name_the_field():
    base = {"model": {"target": TARGET}}
    for overrides, field in [
        (["compression.weights=int3"], "compression.weights"),
        (["compression.group_size=48"], "compression.group_size"),
        (["compression.visual_tokens.keep=0"], "compression.visual_tokens.keep"),
        (["compression.visual_tokens.method=random"], "compression.visual_tokens.method"),
        (["compression.weights=int8", "decoding.backend=hf"], "compression.weights"),
        (["compression.visual_tokens.keep=0.5", "decoding.decoder=hf"], "compression.visual_tokens"),
        (["compression.weights=int8", "compression.apply_to=drafter"], "compression.apply_to"),
        (["model.drafter=self-int2"], "model.drafter"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(base, overrides)
        assert str(e.value).startswith(field), (overrides, str(e.value))


def test_job_records_compression_and_measured_agreement(tmp_path, ray_address):
    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=16, fmt="webdataset", rows_per_shard=16)
    out = tmp_path / "out"
    sets = [f"input.paths=['{shards}/*.tar']", f"output.path={out}", f"model.target={TARGET}",
            "model.drafter=self-int4", "compression.weights=int8", "compression.visual_tokens.keep=0.75",
            "compression.evaluate=true", "compression.evaluate_fraction=0.5", "resources.cpus_per_actor=1"]
    done = run_cli("run", str(ROOT / "configs/demo.yaml"), *[a for s in sets for a in ("--set", s)],
                   address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    c = metrics["compression"]
    assert c["weights"] == "int8" and c["visual_tokens"]["keep"] == 0.75 and c["self_speculation"] == "self-int4"
    ev = c["evaluation"]
    assert 0 < ev["rows"] < 16  # a sample, chosen by key
    assert 0.5 <= ev["token_agreement"] <= 1 and 0 <= ev["exact_match_agreement"] <= 1
    assert metrics["rows"] == 16 and metrics["errors"] == 0 and metrics["acceptance_rate"] > 0.5
    assert "compression:" in done.stdout
