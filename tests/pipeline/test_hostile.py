"""Hostile and broken input: each bad row becomes an error row with a clear reason, or is handled correctly;
the job exits 0, no good row is lost, and nothing is written outside the output directory."""
import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from actors.row_schemas import RESULT
from pipeline.config_sections import InputConfig
from pipeline.preprocess import build_prompt, preprocess_row
from pipeline.read import _webdataset_row, read_shards, table_row
from pipeline.rows import output_table
from pipeline.shards import list_shards
from pipeline.write import OutputDir
from scenes import corpus
from tests.conftest import ROOT, run_cli
from tests.pipeline.hostile_inputs import (
    encode, scene, png_16_bit_gray, palette_with_transparency, animated, exif_rotated, solid, bomb, PNG, SEED,
    NO_MODEL)


# --- text and WebDataset members ---------------------------------------------------------------------------

SHARD_OF = {"/data/shard.tar": "shard"}


def sample(key: str = "s-1", **members: bytes) -> dict:
    """A sample as Ray's read_webdataset (decoder=None) hands it over: one bytes value per member suffix."""
    return {"__key__": key, "__url__": "/data/shard.tar", **members}


def test_a_null_value_is_an_error_not_the_prompt_None():
    assert build_prompt("{question}", {"question": 5}) == "5"  # a number where text is expected is formatted
    with pytest.raises(ValueError, match="'question' is null or not UTF-8 text"):
        build_prompt("{question}", {"question": None})


@pytest.mark.parametrize("members, prompt, reason", [
    ({"json": b'{"question": null}'}, "{question}", "the row's 'question' is null or not UTF-8 text"),
    ({"json": b'{"answer": "a"}'}, "{question}", "the row has no column 'question'"),
    ({"json": '{"question": "caf\xe9?"}'.encode("latin-1")}, "{question}", "the .json member is not valid UTF-8 JSON"),
    ({"json": b'{"question": "\\ud800?"}'}, "{question}", "the row's 'question' is null or not UTF-8 text"),
    ({"json": b"[" * 100_000}, "{question}", "the .json member is not valid UTF-8 JSON"),  # RecursionError
    ({"json": b'["a", "list"]'}, "{question}", "the .json member is a JSON list, not an object"),
    ({"txt": b"\xff\xfe?"}, "{txt}", "the row's 'txt' is null or not UTF-8 text"),
], ids=["null", "missing", "latin-1", "lone-surrogate", "deep", "list", "txt"])
def test_missing_null_or_non_utf8_text_becomes_an_error_row(members, prompt, reason):
    row = _webdataset_row(sample(png=PNG, **members), InputConfig(), SHARD_OF)
    out = preprocess_row(row, NO_MODEL, prompt, 10**7)
    assert reason in out["error"]
    assert pa.Table.from_pylist([out]).num_rows == 1 and out["model_inputs"] is None  # still a well-formed row


def test_a_sample_without_an_image_member_names_what_it_has():
    row = _webdataset_row(sample(gif=animated("GIF"), json=b'{"question": "q"}'), InputConfig(), SHARD_OF)
    assert row["error"] == "the row has no image (no jpg or jpeg or png or webp member; members: gif, json)"
    # Ray builds blocks through pandas: members that other samples of the block have arrive as NaN
    row = _webdataset_row(sample(png=float("nan"), txt=float("nan"), json=b'{"question": "q"}'), InputConfig(),
                          SHARD_OF)
    assert row["error"] == "the row has no image (no jpg or jpeg or png or webp member; members: json)"
    assert row["fields"] == {"question": "q"}


@pytest.mark.parametrize("key, reason", [
    ("../evil", "an absolute path or one with '..'"),
    ("a/../../evil", "an absolute path or one with '..'"),
    ("/abs/evil", "an absolute path or one with '..'"),
    ("..\\evil", "an absolute path or one with '..'"),
    (b"\xff\xfe-evil".decode("utf-8", "surrogateescape"), "not UTF-8"),  # as tarfile names it
])
def test_unsafe_tar_member_names_become_error_rows(key, reason):
    row = _webdataset_row(sample(key, png=PNG, json=b'{"question": "q"}'), InputConfig(), SHARD_OF)
    assert row["error"].startswith("tar member name ") and reason in row["error"]
    row["key"].encode("utf-8")  # Arrow can write it


@pytest.mark.parametrize("key", ["train/0001", "a..b", "./x"])
def test_ordinary_nested_keys_are_accepted(key):
    row = _webdataset_row(sample(key, png=PNG, json=b'{"question": "q"}'), InputConfig(), SHARD_OF)
    assert row["error"] is None and row["key"] == key


# --- parquet and table rows --------------------------------------------------------------------------------

@pytest.mark.parametrize("image, reason", [
    (5, "image: column 'image' holds int, not image bytes"),
    (10**12, "holds int"),  # bytes(10**12) would ask for a terabyte
    ("not bytes", "holds str"),  # bytes("...") raised TypeError and crashed the task
    (np.zeros((2, 2, 2, 2)), "image: the float64 array of shape (2, 2, 2, 2) is not an image"),
    ({"bytes": 7, "path": None}, "holds int"),
])
def test_wrong_types_in_the_image_column_become_error_rows(image, reason):
    row = table_row({"key": 7, "image": image, "question": "q"}, InputConfig(id_column="key"), "shard")
    assert reason in row["error"] and row["image"] is None and row["key"] == "7"


def test_a_parquet_shard_with_nulls_and_wrong_types_through_ray(tmp_path, ray_address):
    pq.write_table(pa.table({"key": ["int", "huge", "null"], "image": [5, 10**12, None],
                             "question": [1, None, None]}), tmp_path / "types.parquet")
    cfg = InputConfig(paths=[str(tmp_path / "types.parquet")], format="parquet", id_column="key")
    ds, normalise = read_shards(cfg, list_shards(cfg))
    rows = ds.map(lambda r: preprocess_row(normalise(r), NO_MODEL, "{question}", 10**7)).take_all()
    errors = {r["key"]: r["error"] for r in rows}
    assert "not image bytes" in errors["int"] and "not image bytes" in errors["huge"]
    assert "'question' is null" in errors["null"]


@pytest.mark.xfail(strict=True, reason="pipeline.read.read_shards: ray.data.read_parquet unifies every file's "
                                       "schema up front (binary vs int64 image) and the job fails")
def test_parquet_shards_whose_column_types_differ_are_read(tmp_path, ray_address):
    pq.write_table(pa.table({"image": [PNG], "question": ["q"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": [5], "question": [1]}), tmp_path / "b.parquet")
    cfg = InputConfig(paths=[str(tmp_path / "*.parquet")], format="parquet")
    ds, normalise = read_shards(cfg, list_shards(cfg))
    rows = ds.map(lambda r: preprocess_row(normalise(r), NO_MODEL, "{question}", 10**7)).take_all()
    assert len(rows) == 2


def test_an_output_column_of_mixed_types_is_written(tmp_path):
    """Two batches of one shard whose carried `score` has different types (and a {} Parquet cannot hold)."""
    parts = [pa.Table.from_pylist([{**{f.name: None for f in RESULT}, "key": k,
                                    "carried": json.dumps({"score": v, "meta": {}})}], schema=RESULT)
             for k, v in (("a", 1), ("b", "high"))]
    OutputDir(str(tmp_path)).commit("shard", output_table("shard", parts, ["score", "meta"]))
    table = pq.read_table(tmp_path / "part-shard.parquet")
    assert table.column("score").to_pylist() == ["1", "high"] and table.column("meta").to_pylist() == ["{}", "{}"]


def test_a_tar_member_name_that_is_not_utf8_is_read(tmp_path, ray_address):
    with tarfile.open(tmp_path / "names.tar", "w") as tar:
        for suffix, data in (("png", PNG), ("json", b'{"question": "q"}')):
            info = tarfile.TarInfo(b"\xff\xfe-name.".decode("utf-8", "surrogateescape") + suffix)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = InputConfig(paths=[str(tmp_path / "names.tar")], format="webdataset")
    ds, normalise = read_shards(cfg, list_shards(cfg))
    rows = ds.map(lambda r: preprocess_row(normalise(r), NO_MODEL, "{question}", 10**7)).take_all()
    assert len(rows) == 1


# --- end to end --------------------------------------------------------------------------------------------

def hostile_images() -> list[tuple[str, bytes, str | None]]:
    """(name, image bytes, the expected error's text or None for a row that must succeed)."""
    return [
        ("cmyk", encode(scene(1).convert("CMYK"), "JPEG"), None),
        ("sixteen-bit", png_16_bit_gray(), None),
        ("palette", palette_with_transparency(), None),
        ("exif", exif_rotated(), None),
        ("one-pixel", solid((1, 1)), None),
        ("long", solid((1, 200)), None),
        ("truncated", PNG[: len(PNG) // 2], "image: cannot be decoded (PNG: image file is truncated"),
        ("zero-byte", b"", "empty image data"),
        ("not-image", b"<html>not an image</html>", "image: cannot be decoded (not a known image format"),
        ("bomb", bomb(), "image too large: 7000x7000 pixels"),
        ("strip", solid((1, 4000)), "image aspect ratio too extreme: 1x4000"),
    ]


def write_hostile_tar(path: Path, token: str) -> dict[str, str | None]:
    """A WebDataset shard of good and hostile samples; returns each row's output key and its expected error."""
    expected: dict[str, str | None] = {}

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def meta(**values) -> bytes:
        return json.dumps({"answer": "?", **values}).encode()

    with tarfile.open(path, "w") as tar:
        for i in range(4):
            s = corpus.sample(SEED, i)
            add(f"good-{i}.png", corpus.encode_png(s.image))
            add(f"good-{i}.txt", s.question.encode())
            add(f"good-{i}.json", meta(question=s.question))
            expected[f"good-{i}"] = None
        for name, image, reason in hostile_images() + [("animated", animated("WEBP"), None)]:
            suffix = "webp" if name == "animated" else "jpg" if image.startswith(b"\xff\xd8") else "png"
            add(f"{name}.{suffix}", image)
            add(f"{name}.json", meta(question="What is it?"))
            expected[name] = reason
        texts = [
            ("bad-txt", b"\xff\xfe", meta(question="What is it?"), None),  # an unused .txt that is not UTF-8
            ("int-question", None, meta(question=5), None),
            ("no-question", None, meta(), "the row has no column 'question'"),
            ("null-question", None, meta(question=None), "the row's 'question' is null or not UTF-8 text"),
            ("surrogate", None, b'{"question": "\\ud800?"}', "the row's 'question' is null or not UTF-8 text"),
            ("latin-1", None, '{"question": "caf\xe9?"}'.encode("latin-1"), "the .json member is not valid UTF-8"),
            ("deep", None, b"[" * 100_000, "the .json member is not valid UTF-8 JSON"),
        ]
        for name, txt, js, reason in texts:
            add(f"{name}.png", PNG)
            if txt is not None:
                add(f"{name}.txt", txt)
            add(f"{name}.json", js)
            expected[name] = reason
        add("no-image.json", meta(question="What is it?"))
        expected["no-image"] = "the row has no image (no jpg or jpeg or png or webp member; members: json)"
        for key in (f"../evil-{token}", f"/specray-evil-{token}/evil", f"a/../../evil-{token}"):
            add(f"{key}.png", PNG)
            add(f"{key}.json", meta(question="What is it?"))
            expected[key] = "tar member name "
        link = tarfile.TarInfo(f"link-evil-{token}.png")  # Ray skips links: the sample has no image
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        add(f"link-evil-{token}.json", meta(question="What is it?"))
        expected[f"link-evil-{token}"] = "the row has no image"
    return expected


def write_hostile_parquet(path: Path) -> dict[str, str | None]:
    rows, expected = [], {}
    for i in range(3):
        s = corpus.sample(SEED, i)
        rows.append({"key": f"good-{i}", "image": corpus.encode_png(s.image), "question": s.question.encode()})
        expected[f"good-{i}"] = None
    rows.append({"key": None, "image": PNG, "question": b"What is it?"})  # no id: keyed by its position
    expected[f"{path.stem}:{len(rows) - 1}"] = None
    for name, image, reason in hostile_images() + [("animated", animated("GIF"), None)]:
        rows.append({"key": name, "image": image, "question": b"What is it?"})
        expected[name] = reason
    for name, image, question, reason in [
        ("null-image", None, b"What is it?", "the row has no image"),
        ("null-question", PNG, None, "the row's 'question' is null or not UTF-8 text"),
        ("latin-1-question", PNG, "caf\xe9?".encode("latin-1"), "the row's 'question' is null or not UTF-8 text"),
    ]:
        rows.append({"key": name, "image": image, "question": question})
        expected[name] = reason
    schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("question", pa.binary())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return expected


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def names_with(token: str, roots: list[Path]) -> list[str]:
    found = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in (".venv", ".git")]
            found += [os.path.join(folder, n) for n in dirs + files if token in n]
    return found


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_hostile_shards_end_to_end(tmp_path, tiny_model, ray_address, fmt):
    """Every input row comes out exactly once: good ones answered, hostile ones handled or an error row with
    its reason; the job exits 0 and writes nothing outside its output directory."""
    token = uuid.uuid4().hex[:12]
    shards = tmp_path / "shards"
    shards.mkdir()
    if fmt == "webdataset":
        expected = write_hostile_tar(shards / "hostile.tar", token)
    else:
        expected = write_hostile_parquet(shards / "hostile.parquet")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"task": {"kind": "vqa", "prompt": "{question}"},
                                      "decoding": {"backend": "hf"}, "output": {"columns": ["answer"]}}))
    out = tmp_path / "out"
    sets = [f"input.paths=['{shards}/*']", f"input.format={fmt}", f"model.target={tiny_model}", f"output.path={out}",
            "decoding.max_new_tokens=4", "resources.cpus_per_actor=1", "resources.num_actors=1"]
    if fmt == "parquet":
        sets.append("input.id_column=key")
    before = files_under(tmp_path)

    done = run_cli("run", str(config), *[a for s in sets for a in ("--set", s)], address=ray_address)

    assert done.returncode == 0, done.stderr[-3000:]
    table = pq.read_table(out / "part-hostile.parquet")
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(expected)  # every input row exactly once
    for row in table.to_pylist():
        reason = expected[row["key"]]
        if reason is None:
            assert row["error"] is None, (row["key"], row["error"])
            assert row["finish_reason"] in ("stop", "length") and row["num_output_tokens"] >= 1
        else:
            assert row["finish_reason"] == "error" and reason in (row["error"] or ""), (row["key"], row["error"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == len(expected)
    assert metrics["errors"] == sum(r is not None for r in expected.values())

    assert {p for p in files_under(tmp_path) - before if out not in p.parents} == set()
    assert names_with(token, [tmp_path.parent, ROOT, Path(os.environ["RAY_TMPDIR"])]) == []
    assert not Path(f"/specray-evil-{token}").exists() and not (ROOT.parent / f"evil-{token}.png").exists()
