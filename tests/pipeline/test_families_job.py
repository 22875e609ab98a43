"""The families through the CLI: a job over a tiny Qwen2.5-VL, Gemma 3, SmolVLM and Mistral3, each with its own saved
processor, on this machine without torchvision, gives the `hf` backend's output row for row (the backend run on
the same images and questions); Mllama and Florence-2 are refused at start with one line (exit 2), before any
work. The other families run through the job on both backends in benchmarks/families.py --job."""
from __future__ import annotations

import importlib.util
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from benchmarks.family_models import build_family, sample_images
from engine.config import EngineConfig
from engine.hf_backend import HFBackend
from engine.processor import encode, load_processor
from engine.request import Request, SamplingParams, shape_key
from tests.conftest import run_cli

QUESTIONS = ["What is shown?", "Describe the colours.", "Count the shapes."]


def write_rows(tmp_path, n: int = 12) -> list:
    """A parquet shard of n images and questions; returns the images and questions."""
    images, questions = sample_images(n, seed=5), [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    data = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data.append(buf.getvalue())
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"key": [f"r{i}" for i in range(n)], "image": data, "question": questions}),
                   tmp_path / "shards" / "shard-0.parquet")
    return list(zip(images, questions))


def hf_backend_texts(model, rows) -> dict:
    """The hf backend (model.generate, left-padded batches of same-shaped image tensors, as the job's actors group
    them, float32) on the same images and questions."""
    processor = load_processor(str(model))
    requests = [Request(key=f"r{i}", input_ids=ids, model_inputs=arrays)
                for i, (ids, arrays) in enumerate(encode(processor, q, image) for image, q in rows)]
    backend = HFBackend(EngineConfig(str(model), backend="hf", dtype="float32"))
    groups: dict[tuple, list[Request]] = {}
    for r in requests:
        groups.setdefault(shape_key(r.model_inputs), []).append(r)
    out = {}
    for group in groups.values():
        out |= {r.key: res.text for r, res in zip(group, backend.generate(group, SamplingParams(max_new_tokens=12)))}
    return out


def config(tmp_path, model, backend: str, out: str):
    cfg = {
        "input": {"paths": [str(tmp_path / "shards" / "*.parquet")], "format": "parquet", "id_column": "key"},
        "task": {"kind": "vqa", "prompt": "{question}"},
        "model": {"target": str(model), "drafter": "ngram" if backend == "specray" else None},
        "decoding": {"backend": backend, "dtype": "float32", "max_new_tokens": 12},
        "output": {"path": str(tmp_path / out)},
        "resources": {"num_actors": 1, "cpus_per_actor": 1, "batch_size": 16},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def texts(out) -> dict:
    rows = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
    return {r["key"]: r["text"] for r in rows}


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3", "smolvlm", "mistral3"])
def test_a_family_job_with_its_own_processor_equals_the_hf_backend(name, tmp_path, ray_address):
    assert importlib.util.find_spec("torchvision") is None
    model = build_family(name, tmp_path / "model")
    rows = write_rows(tmp_path)
    done = run_cli("run", str(config(tmp_path, model, "specray", "specray")), address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    spec, hf = texts(tmp_path / "specray"), hf_backend_texts(model, rows)
    assert len(spec) == 12 and spec == hf
    assert len(set(spec.values())) > 6  # the rows' answers differ
    metrics = json.loads((tmp_path / "specray" / "metrics.json").read_text())
    assert metrics["decoder"]["kind"] == "lean" and metrics["decoder"]["parity_check"]
    # what the check at load cost (two rows, 8 tokens: HF's generate and the engine's forward), within the load
    assert 0 < metrics["startup"]["parity_check_s"] < metrics["startup"]["model_load_s"]
    assert metrics["drafted_tokens"] > 0


@pytest.mark.parametrize("name", ["mllama", "florence2"])
def test_a_model_no_decoder_runs_exactly_is_refused_at_start(name, tmp_path):
    model = build_family(name, tmp_path / "model")
    write_rows(tmp_path, 2)
    done = run_cli("run", str(config(tmp_path, model, "specray", "out")))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: model.target:")
    assert "decoding.backend: hf" in lines[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


def test_a_model_whose_processor_cannot_load_here_is_refused_at_start(tmp_path):
    """Every row would fail the same way (e.g. a processor that needs torchvision): one line, exit 2, no work."""
    model = build_family("qwen2_5_vl", tmp_path / "model")
    saved = model / "processor_config.json"
    processor = json.loads(saved.read_text())
    processor["image_processor"]["image_processor_type"] = "NoSuchImageProcessor"
    saved.write_text(json.dumps(processor))
    write_rows(tmp_path, 2)
    done = run_cli("run", str(config(tmp_path, model, "specray", "out")))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: model.target: its processor cannot be loaded")


def test_a_model_whose_processor_fails_on_every_row_is_refused_at_start(tmp_path):
    """A processor that loads but fails on any one-image prompt (here its chat template raises) would turn the job
    into error rows, on either backend: one line, exit 2, no work."""
    model = build_family("qwen2_5_vl", tmp_path / "model")
    (model / "chat_template.jinja").write_text("{{ raise_exception('this template takes no images') }}")
    write_rows(tmp_path, 2)
    for backend in ("hf", "specray"):
        done = run_cli("run", str(config(tmp_path, model, backend, f"out-{backend}")))
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "config error: model.target: its processor fails on a one-image prompt"), lines
        assert not (tmp_path / f"out-{backend}").exists() or not list((tmp_path / f"out-{backend}").glob("part-*"))
