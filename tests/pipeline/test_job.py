"""End to end: the CLI and the Python API on generated WebDataset and parquet shards."""
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.demo_data import write_demo_data
from tests.conftest import corrupt_bytes, run_cli

BAD_KEYS = ("bad-truncated", "bad-empty", "bad-text")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_bad_tar(folder: Path) -> None:
    with tarfile.open(folder / "shard-bad.tar", "w") as tar:
        for key, image in (("bad-truncated", corrupt_bytes()), ("bad-empty", b""), ("bad-text", b"hello")):
            _add(tar, f"{key}.png", image)
            _add(tar, f"{key}.json", json.dumps({"question": "What is it?", "task": "vqa", "answer": "?"}).encode())


def add_bad_parquet(folder: Path) -> None:
    rows = [{"key": k, "image": img, "question": "What is it?", "task": "vqa", "answer": "?"}
            for k, img in (("bad-truncated", corrupt_bytes()), ("bad-empty", b""), ("bad-text", b"hello"))]
    pq.write_table(pa.Table.from_pylist(rows), folder / "shard-bad.parquet")


def job_config(tmp_path: Path, model: Path, inputs: str, fmt: str, **extra) -> Path:
    cfg = {
        "input": {"paths": [inputs], "format": fmt},
        "task": {"kind": "vqa", "prompt": "{question}"},
        "model": {"target": str(model)},
        "decoding": {"backend": "hf", "max_new_tokens": 4},
        "output": {"path": str(tmp_path / "out"), "columns": ["answer", "task"]},
        "resources": {"num_actors": 1, "cpus_per_actor": 1, "batch_size": 8},
        **extra,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_output(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])


@pytest.mark.parametrize("fmt, suffix", [("webdataset", "tar"), ("parquet", "parquet")])
def test_cli_job_end_to_end(tmp_path, tiny_model, ray_address, fmt, suffix):
    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=20, fmt=fmt, rows_per_shard=8)
    (add_bad_tar if fmt == "webdataset" else add_bad_parquet)(shards)
    cfg = job_config(tmp_path, tiny_model, str(shards / f"*.{suffix}"), fmt)

    first = run_cli("run", str(cfg), address=ray_address)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == ["part-shard-00000.parquet", "part-shard-00001.parquet", "part-shard-00002.parquet",
                     "part-shard-bad.parquet"]
    assert (out / "_SUCCESS").exists() and not list(out.glob("_tmp/*"))
    table = read_output(out)
    assert table.num_rows == 23  # every input row yields exactly one output row
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == len(keys)
    rows = {r["key"]: r for r in table.to_pylist()}
    for key in BAD_KEYS:
        bad = rows[key] if fmt == "webdataset" else next(r for r in rows.values() if r["shard"] == "shard-bad"
                                                           and r["error"] and key.split("-")[1] in r["error"].lower()
                                                           or r["shard"] == "shard-bad" and r["error"])
        assert bad["finish_reason"] == "error" and bad["error"]
    good = [r for r in rows.values() if r["shard"] != "shard-bad"]
    assert all(r["error"] is None and r["finish_reason"] in ("stop", "length") for r in good)
    assert all(r["num_output_tokens"] >= 1 and r["num_prompt_tokens"] > 64 for r in good)
    assert all(r["answer"] and r["task"] for r in good)  # pass-through columns
    if fmt == "parquet":  # no id column configured: keys are <shard>:<row index>
        assert {rows[k]["key"] for k in rows if k.startswith("shard-bad")} == {f"shard-bad:{i}" for i in range(3)}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == 23 and metrics["errors"] == 3
    assert metrics["output_tokens"] == sum(r["num_output_tokens"] for r in rows.values())
    assert metrics["config"]["model"]["target"] == str(tiny_model) and metrics["tokens_per_s"] > 0
    # where the first seconds went: each phase up to the first output row, from the actor's own record
    st = metrics["startup"]
    phases = ("driver_s", "ray_s", "actor_start_s", "imports_s", "model_load_s", "wait_first_batch_s", "first_batch_s")
    assert st["actors"] == 1 and all(st[p] >= 0 for p in phases), st
    assert st["imports_s"] > 0 and st["model_load_s"] > 0 and st["first_batch_s"] > 0
    assert st["compiled"] is None  # decoding.compile is off by default: no compiled step
    assert sum(st[p] for p in phases) <= st["first_row_s"] + 0.5 and st["first_row_s"] <= metrics["wall_s"]
    assert "start:  first row after" in first.stdout

    # a rerun skips every committed shard and adds nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    second = run_cli("run", str(cfg), address=ray_address)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before
    assert read_output(out).num_rows == 23
    assert "4 already done" in second.stdout

    # a new shard in the input is picked up; the old ones are still skipped
    write_demo_data(str(tmp_path / "more"), seed=77, num_samples=3, fmt=fmt)
    (shards / f"shard-new.{suffix}").write_bytes((tmp_path / "more" / f"shard-00000.{suffix}").read_bytes())
    third = run_cli("run", str(cfg), address=ray_address)
    assert third.returncode == 0, third.stderr[-3000:]
    assert read_output(out).num_rows == 26
    assert json.loads((out / "metrics.json").read_text())["shards_written"] == ["shard-new"]


def test_validate_and_run_reject_a_bad_config_with_exit_2(tmp_path, tiny_model):
    cfg = job_config(tmp_path, tiny_model, str(tmp_path / "*.tar"), "webdataset", decoding={"max_new_tokens": -1})
    for command in ("validate", "run"):
        result = run_cli(command, str(cfg))
        assert result.returncode == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "decoding.max_new_tokens" in lines[0]
    assert run_cli("validate", "configs/demo.yaml").returncode == 0
    assert run_cli("run", str(tmp_path / "missing.yaml")).returncode == 2
    assert run_cli("run").returncode == 2  # usage error
    assert run_cli("run", "configs/demo.yaml", "--set", "nokey").returncode == 2


def test_missing_input_is_a_config_error(tmp_path, tiny_model):
    cfg = job_config(tmp_path, tiny_model, str(tmp_path / "nothing-here/*.tar"), "webdataset")
    result = run_cli("run", str(cfg))
    assert result.returncode == 2 and "input.paths" in result.stderr


def test_python_api_run_job_and_generate(tmp_path, tiny_model, ray_address):
    import ray

    import pipeline

    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=6, fmt="parquet", rows_per_shard=6)
    cfg = job_config(tmp_path, tiny_model, str(shards / "*.parquet"), "parquet")
    result = pipeline.run_job(cfg)
    assert isinstance(result, pipeline.JobResult)
    assert result.rows == 6 and result.errors == 0 and result.shards_written == ["shard-00000"]
    assert read_output(tmp_path / "out").num_rows == 6

    ds = ray.data.read_parquet(str(shards))
    blocks = list(pipeline.generate(ds, {"model": {"target": str(tiny_model)}, "task": {"kind": "vqa"},
                                         "decoding": {"max_new_tokens": 3}, "input": {"id_column": "key"},
                                         "resources": {"batch_size": 2}}).iter_batches(batch_size=None))
    # one block per batch: a batch's rows come out when it is done, not when the rest of its shard is
    assert [len(b["key"]) for b in blocks] == [2, 2, 2]
    out = [{k: v[i] for k, v in b.items()} for b in blocks for i in range(len(b["key"]))]
    assert len(out) == 6
    for row in out:
        assert row["error"] is None and row["finish_reason"] in ("stop", "length")
        assert row["answer"] and row["question"] and "image" not in row  # input columns kept, image bytes dropped
        assert 1 <= row["num_output_tokens"] <= 3
    assert sorted(r["key"] for r in out) == sorted(pq.read_table(shards / "shard-00000.parquet").column("key").to_pylist())


def test_hf_dataset_input(tmp_path, tiny_model, ray_address):
    import datasets

    import pipeline
    from scenes import corpus

    samples = [corpus.sample(corpus.SPLIT_SEEDS["test"], i) for i in range(5)]
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    hf = datasets.Dataset.from_dict({"image": [s.image for s in samples], "question": [s.question for s in samples],
                                     "answer": [s.answer for s in samples]}, features=features)
    hf.save_to_disk(str(tmp_path / "my-hf-set"))
    result = pipeline.run_job(job_config(tmp_path, tiny_model, str(tmp_path / "my-hf-set"), "hf"))
    assert result.rows == 5 and result.errors == 0 and result.shards_written == ["my-hf-set"]
    table = pq.read_table(tmp_path / "out" / "part-my-hf-set.parquet")
    assert table.column("key").to_pylist() == [f"my-hf-set:{i}" for i in range(5)]
    assert table.column("answer").to_pylist() == [s.answer for s in samples]


def test_demo_job_speculates_and_matches_the_hf_backend(tmp_path, ray_address):
    """The demo config (specray engine + the shipped VLM drafter) through the CLI: the same answers as the hf
    backend (both float32), with drafted and accepted counts per row and the acceptance rate in metrics.json."""
    root = Path(__file__).resolve().parents[2]
    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=24, fmt="webdataset", rows_per_shard=12)
    texts = {}
    for backend in ("specray", "hf"):
        out = tmp_path / f"out-{backend}"
        sets = [f"input.paths=['{shards}/*.tar']", f"output.path={out}", "decoding.dtype=float32",
                f"model.target={root / 'models/target'}", f"model.drafter={root / 'models/drafter-vlm'}",
                "resources.cpus_per_actor=1"]
        if backend == "hf":
            sets += ["decoding.backend=hf", "model.drafter=null"]
        args = [a for s in sets for a in ("--set", s)]
        done = run_cli("run", str(root / "configs/demo.yaml"), *args, address=ray_address)
        assert done.returncode == 0, done.stderr[-3000:]
        table = read_output(out)
        texts[backend] = dict(zip(table.column("key").to_pylist(), table.column("text").to_pylist()))
        if backend == "specray":
            drafted = sum(table.column("num_drafted_tokens").to_pylist())
            accepted = sum(table.column("num_accepted_tokens").to_pylist())
            assert drafted > 0 and 0.4 * drafted < accepted <= drafted
            metrics = json.loads((out / "metrics.json").read_text())
            assert metrics["acceptance_rate"] == pytest.approx(accepted / drafted)
    assert len(texts["specray"]) == 24 and texts["specray"] == texts["hf"]


@pytest.mark.parametrize("columns, id_column, carried", [
    (["answer", "task"], None, ["answer", "task"]),
    (["key", "answer"], "key", ["answer"]),  # the id column is the key: used, not carried apart
    (["text"], None, "'text'"),
    (["answer", "num_output_tokens"], "key", "'num_output_tokens'"),
    (["error"], "key", "'error'"),
])
def test_an_input_column_named_like_an_output_column_is_never_shadowed(columns, id_column, carried):
    from pipeline.config import ConfigError, load_config
    from pipeline.rows import check_columns

    cfg = load_config({"model": {"target": "m"}, "input": {"id_column": id_column}, "output": {"columns": columns}})
    if isinstance(carried, list):
        assert check_columns(cfg) == carried
    else:
        with pytest.raises(ConfigError, match=f"^output.columns: {carried} is a column of the output itself"):
            check_columns(cfg)


def test_a_job_carrying_a_column_named_like_an_output_column_exits_2(tmp_path, tiny_model):
    write_demo_data(str(tmp_path / "shards"), num_samples=2, fmt="parquet")
    cfg = job_config(tmp_path, tiny_model, str(tmp_path / "shards/*.parquet"), "parquet",
                     output={"path": str(tmp_path / "out"), "columns": ["answer", "text"]})
    result = run_cli("run", str(cfg))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "output.columns: 'text'" in lines[0], result.stderr
    assert not (tmp_path / "out" / "_LOCK").exists()


def test_carried_columns_and_tensors_survive_ray_blocks(tmp_path, ray_address):
    """The row contract through Ray Data as a job runs it: preprocessed blocks built as the preprocess stage builds
    them (a carried column holding 1 in one row and "high" in another, within a block and across blocks; nested
    values; a column null in whole blocks; tensors of varying shapes; error rows without tensors), with Ray's
    pickled fallback off, the generate actor reading them from Arrow batches (each joining two blocks), and the
    driver's part files."""
    import numpy as np
    import ray

    from actors.generate_actor import GenerateActor
    from actors.generate_rows import tensor_entries
    from engine.request import Result, SamplingParams
    from pipeline.commit import shard_runs
    from pipeline.rows import output_table, preprocessed_table
    from pipeline.write import OutputDir

    def pixels(i):
        return np.arange(6 * (i + 1), dtype=np.float32).reshape(1, 3, i + 1, 2)

    def preprocessed(row):  # rows 0-6 are shard a, 7-11 shard b; 4 and 9 failed preprocessing
        i, bad = row["id"], row["id"] in (4, 9)
        return {"shard": "a" if i < 7 else "b", "key": None if i == 5 else f"k{i}",
                "input_ids": np.ones(0 if bad else i + 1, np.int64), "num_prompt_tokens": 0 if bad else i + 1,
                "model_inputs": None if bad else tensor_entries({"pixel_values": pixels(i),
                                                                 "sizes": np.array([[i, 2]])}),
                "error": "boom" if bad else None,
                "carried": {"score": "high" if i == 8 else i, "meta": {"lang": "en", "n": [i]},
                            "note": None if i < 7 else f"n{i}"}}

    def echo(r):  # what the actor handed the engine
        arrays = ",".join(f"{k}{list(v.shape)}={float(v.sum()):g}" for k, v in sorted(r.model_inputs.items()))
        return f"{r.key}|{arrays}|{len(r.input_ids)}"

    class Engine:
        def generate(self, requests, params):
            return [Result(echo(r), "stop", 1) for r in requests]

    class Actor(GenerateActor):
        def __init__(self):
            self.engine, self.params, self.mixed_shapes = Engine(), SamplingParams(), False  # batches by shape
            self.evaluate = self.reference = None

    def stage(block):  # as pipeline/stages.py's preprocess stage builds its blocks
        return preprocessed_table([preprocessed(r) for r in block.to_pylist()])

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_fallback_to_arrow_object_ext_type, ctx.execution_options.preserve_order
    ctx.enable_fallback_to_arrow_object_ext_type, ctx.execution_options.preserve_order = False, True
    try:
        ds = ray.data.range(12, override_num_blocks=4).map_batches(stage, batch_size=3, batch_format="pyarrow").map_batches(
            Actor, batch_size=5, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1))
        parts: dict[str, list] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for shard, rows in shard_runs(batch):
                parts.setdefault(shard, []).append(rows)
    finally:
        ctx.enable_fallback_to_arrow_object_ext_type, ctx.execution_options.preserve_order = saved
    out = OutputDir(str(tmp_path))
    for shard, tables in parts.items():
        out.commit(shard, output_table(shard, tables, ["score", "meta", "note"]))
    a, b = (pq.read_table(tmp_path / f"part-{s}.parquet") for s in "ab")

    assert a.column("key").to_pylist() == ["k0", "k1", "k2", "k3", "k4", "a:5", "k6"]
    for table, rows in ((a, range(7)), (b, range(7, 12))):
        for i, got in zip(rows, table.to_pylist()):
            if i in (4, 9):
                assert (got["error"], got["finish_reason"], got["text"]) == ("boom", "error", "")
            else:
                key = "None" if i == 5 else f"k{i}"
                arrays = f"pixel_values{[1, 3, i + 1, 2]}={pixels(i).sum():g},sizes[1, 2]={i + 2}"
                assert got["text"] == f"{key}|{arrays}|{i + 1}"
                assert got["error"] is None and got["num_prompt_tokens"] == i + 1
            assert got["meta"] == {"lang": "en", "n": [i]}
    # a's rows are all ints, even where a block also held b's "high": an int column
    assert a.schema.field("score").type == pa.int64() and a.column("score").to_pylist() == list(range(7))
    assert b.column("score").to_pylist() == ["7", "high", "9", "10", "11"]  # no one type: text
    assert a.column("note").null_count == 7 and b.column("note").to_pylist() == [f"n{i}" for i in range(7, 12)]


@pytest.mark.parametrize("column", ["text", "error"])
def test_the_python_api_refuses_an_input_column_the_cli_refuses(tmp_path, tiny_model, ray_address, column):
    """An input column named like an output column: the command line exits 2 with one line naming it (it is in
    output.columns), and pipeline.generate (which carries every input column) raises the same line, before any
    work, instead of dropping the column."""
    import ray

    import pipeline

    write_demo_data(str(tmp_path / "shards"), num_samples=2, fmt="parquet")
    cfg = job_config(tmp_path, tiny_model, str(tmp_path / "shards/*.parquet"), "parquet",
                     output={"path": str(tmp_path / "out"), "columns": ["answer", column]})
    cli = run_cli("validate", str(cfg))
    lines = [line for line in cli.stderr.splitlines() if line.strip()]
    assert cli.returncode == 2 and len(lines) == 1 and f"output.columns: {column!r}" in lines[0], cli.stderr

    ds = ray.data.from_items([{"image": b"", "question": "q", column: "an input value"}])
    with pytest.raises(pipeline.ConfigError) as refused:
        pipeline.generate(ds, {"model": {"target": str(tiny_model)}})
    assert lines[0].endswith(str(refused.value)) and "\n" not in str(refused.value)
    # the id column named like an output column is the key itself, not a shadowing column
    keyed = ray.data.from_items([{"image": b"", "question": "q", "key": "k0"}])
    pipeline.generate(keyed, {"model": {"target": str(tiny_model)}, "input": {"id_column": "key"}})
