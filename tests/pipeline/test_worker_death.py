"""A row that kills the generate actor's process every time it is tried: the job isolates it and goes on."""
from __future__ import annotations

import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from scenes import corpus
from tests.conftest import ROOT, run_cli

MEMORY_PER_ACTOR = 1000 * 2**20  # an actor of the shipped target idles near 0.6 GiB; the big image needs >1.3 GiB


def test_a_row_that_kills_the_worker_is_isolated_and_every_other_row_written_once(tmp_path, ray_address):
    """resources.memory_per_actor kills the actor's process when one row's image (1536x1536 pixels, which the
    target's processor here lets through as 9,216 visual tokens) takes it past the limit, every time that row
    is tried. Ray restarts the actor and re-runs the batch; after the batch killed it twice it is split, and the
    row that kills it alone becomes an error row naming the reason. The job exits 0 and writes every other row
    exactly once."""
    model = tmp_path / "target"
    shutil.copytree(ROOT / "models/target", model)
    processor = json.loads((model / "processor_config.json").read_text())
    processor["image_processor"]["size"]["longest_edge"] = 1536 * 1536  # the processor's largest image, in pixels
    (model / "processor_config.json").write_text(json.dumps(processor))

    rows = []
    for i in range(6):
        s = corpus.sample(corpus.SPLIT_SEEDS["test"], i)
        image = s.image.resize((1536, 1536)) if i == 3 else s.image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows.append({"key": s.key, "image": buf.getvalue(), "question": s.question})
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shards/shard-0.parquet")
    cfg = {"input": {"paths": [str(tmp_path / "shards/*.parquet")], "format": "parquet", "id_column": "key"},
           "task": {"kind": "vqa"}, "model": {"target": str(model)},
           "decoding": {"backend": "hf", "max_new_tokens": 2},
           "output": {"path": str(tmp_path / "out")},
           "resources": {"num_actors": 1, "batch_size": 2, "memory_per_actor": MEMORY_PER_ACTOR,
                         "worker_death_retries": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))

    result = run_cli("run", str(tmp_path / "job.yaml"), address=ray_address)
    assert result.returncode == 0, result.stderr[-3000:]
    out = pq.read_table(tmp_path / "out/part-shard-0.parquet").to_pylist()
    assert sorted(r["key"] for r in out) == sorted(r["key"] for r in rows)  # each row once
    killer = rows[3]["key"]
    for r in out:
        if r["key"] == killer:  # two deaths of its batch, one alone
            assert (r["finish_reason"], r["error"]) == ("error", "worker died 3 times on this row"), r
        else:
            assert r["error"] is None and r["num_output_tokens"] >= 1, r
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["errors"] == 1 and metrics["errors_by_reason"] == {"worker died 3 times on this row": 1}
