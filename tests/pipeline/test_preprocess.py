import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from actors.generate_rows import read_input_ids, read_tensors
from actors.row_schemas import PREPROCESSED
from engine.processor import chat_text, load_processor
from pipeline.preprocess import build_prompt, decode_image, preprocess_row, prompt_columns
from pipeline.rows import check_source_row, preprocessed_table
from tests.conftest import corrupt_bytes


def png(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(png(image, format="JPEG", exif=exif), max_pixels=10**6)
    assert decoded.size == (20, 40)


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "L", "I;16", "RGBA"])
def test_any_mode_becomes_rgb(mode):
    image = Image.new(mode, (8, 8))
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    assert decode_image(png(image, format=fmt), 10**6).mode == "RGB"


def test_pixel_bound_refuses_a_decompression_bomb_before_decoding():
    bomb = png(Image.new("L", (5000, 5000)))  # tiny file, 25M pixels
    with pytest.raises(ValueError, match="too large"):
        decode_image(bomb, max_pixels=1_000_000)


@pytest.mark.parametrize("data", [b"", b"not an image at all", corrupt_bytes()])
def test_broken_images_raise(data):
    with pytest.raises(Exception):
        decode_image(data, 10**6)


def test_prompt_template_takes_row_values_and_names_missing_columns():
    assert build_prompt("Q: {question}", {"question": "why?"}) == "Q: why?"
    with pytest.raises(ValueError, match="no column 'question'"):
        build_prompt("Q: {question}", {})


def test_prompt_columns_are_the_root_names_the_template_uses():
    assert prompt_columns("Q: {question} ({meta[lang]}, {src.name}) {{literal}}") == {"question", "meta", "src"}
    assert prompt_columns("Describe the image.") == set()


def _row(image: bytes | None, fields: dict) -> dict:
    return {"shard": "s", "key": "k", "image": image, "image_path": None, "fields": fields}


def test_preprocess_row_builds_model_inputs(tiny_model):
    good = png(Image.new("RGB", (64, 48), (0, 0, 255)))
    row = _row(good, {"question": "What color?", "answer": "blue", "text": "an input column named text"})
    out = preprocess_row(row, str(tiny_model), "{question}", 10**7, carry=["answer"])
    assert out["error"] is None
    assert out["num_prompt_tokens"] == len(out["input_ids"]) > 64  # 64 image tokens plus the text
    assert "What color?" in load_processor(str(tiny_model)).tokenizer.decode(out["input_ids"])
    assert out["carried"] == {"answer": "blue"}  # the prompt's column is used up; only output.columns go on
    # the preprocessed row as Arrow, as the stage builds it: the contract's types, token ids from numpy, and the
    # tensors read back as they were made
    assert isinstance(out["input_ids"], np.ndarray) and out["input_ids"].dtype == np.int64
    table = preprocessed_table([out])
    assert table.schema == PREPROCESSED and table.num_rows == 1
    assert np.array_equal(read_input_ids(table.column("input_ids"))[0], out["input_ids"])
    pixels = read_tensors(table.column("model_inputs"))[0]["pixel_values"]
    processor = load_processor(str(tiny_model))
    expected = processor(text=[chat_text(processor, "?")], images=[decode_image(good, 10**7)],
                         return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 96, 96) and pixels.dtype == expected.dtype and np.array_equal(pixels, expected)
    assert not pixels.flags.owndata  # a view of the Arrow buffer, not a copy
    # every field (pipeline.generate, which refuses up front a column named like one of its own output columns)
    assert preprocess_row(row, str(tiny_model), "{question}", 10**7)["carried"] == {
        "question": "What color?", "answer": "blue", "text": "an input column named text"}


@pytest.mark.parametrize("image, fields, reason", [
    (corrupt_bytes(), {"question": "q"}, "OSError"),
    (b"", {"question": "q"}, "empty image"),
    (None, {"question": "q"}, "has no image"),
    (png(Image.new("RGB", (8, 8))), {}, "no column 'question'"),
])
def test_preprocess_failures_become_one_line_errors(tiny_model, image, fields, reason):
    out = preprocess_row(_row(image, fields), str(tiny_model), "{question}", 10**7)
    assert reason in out["error"] and "\n" not in out["error"]
    assert len(out["input_ids"]) == 0 and out["shard"] == "s" and out["key"] == "k"
    assert out["model_inputs"] is None  # an error row carries no tensors


def test_image_from_a_path_column(tiny_model, tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (30, 30), (1, 2, 3)).save(path)
    row = {"shard": "s", "key": "k", "image": None, "image_path": str(path), "fields": {}}
    out = preprocess_row(row, str(tiny_model), "Describe.", 10**7)
    assert out["error"] is None and np.asarray(out["input_ids"]).size > 0


def test_a_worker_loads_the_processor_once_not_per_row(tiny_model, monkeypatch):
    import pipeline.preprocess as pre

    loads = []
    real = pre.load_processor
    monkeypatch.setattr(pre, "load_processor", lambda *a: loads.append(a) or real(*a))
    pre.processor_of.cache_clear()
    good = png(Image.new("RGB", (32, 32), (0, 255, 0)))
    for _ in range(3):
        assert preprocess_row(_row(good, {"question": "What?"}), str(tiny_model), "{question}", 10**7)["error"] is None
    assert len(loads) == 1
    pre.processor_of.cache_clear()


@pytest.mark.parametrize("resources,tasks", [
    ({}, 1),  # one CPU-only actor: one preprocess task (a worker process that loads the processor once)
    ({"num_actors": 3}, 3),
    ({"gpus_per_actor": 1}, None),  # GPU actors: as many as the free CPUs allow
    ({"preprocess_tasks": 4}, 4),
])
def test_preprocess_tasks_at_once(resources, tasks, monkeypatch):
    from pipeline import stages
    from pipeline.config import load_config
    from pipeline.stages import generate_stages

    monkeypatch.setattr(stages, "_worker_deaths", lambda: None)  # no Ray here

    class Dataset:  # records what the job asks of Ray Data
        def map_batches(self, fn, **kwargs):
            if not hasattr(self, "kwargs"):  # the first: the preprocess stage
                self.kwargs = kwargs
            return self

        def repartition(self, **kwargs):
            self.repartition_kwargs = kwargs
            return self

    cfg = load_config({"input": {"paths": ["x/*.tar"]}, "model": {"target": "models/target"},
                       "output": {"path": "out"}, "resources": resources})
    ds = Dataset()
    generate_stages(ds, cfg, normalise=lambda row: row)
    assert ds.kwargs["concurrency"] == tasks and ds.kwargs["batch_format"] is None  # rows as Ray reads them
    assert ds.repartition_kwargs == {"target_num_rows_per_block": cfg.resources.batch_size}  # a block per batch


def _preprocessed(**change) -> dict:
    row = {"shard": "s", "key": None, "input_ids": np.arange(3, dtype=np.int64), "num_prompt_tokens": 3,
           "model_inputs": None, "error": None, "carried": {"score": 1}}
    return {**row, **change}


def test_a_preprocessed_row_that_drifts_from_the_contract_fails_its_batch_loudly():
    assert preprocessed_table([_preprocessed(), _preprocessed(carried={"score": "high"})]).schema \
        == PREPROCESSED  # values of no one type travel in carried's JSON, never pickled
    with pytest.raises(ValueError, match="drifted from PREPROCESSED.*'extra'"):
        preprocessed_table([_preprocessed(extra=1)])
    with pytest.raises(ValueError, match="drifted from PREPROCESSED"):
        preprocessed_table([{k: v for k, v in _preprocessed().items() if k != "error"}])
    with pytest.raises(ValueError, match="column 'num_prompt_tokens' does not fit PREPROCESSED's int32"):
        preprocessed_table([_preprocessed(num_prompt_tokens="3")])
    for ids in (np.array(["a"]), np.array([1.5]), np.ones((2, 2), np.int64)):  # never cast quietly
        with pytest.raises(ValueError, match="column 'input_ids' does not fit.*one row of integers"):
            preprocessed_table([_preprocessed(input_ids=ids)])


def test_a_source_row_that_drifts_from_the_contract_is_refused():
    row = {"shard": "s", "key": None, "image": b"x", "image_path": None, "fields": {}, "error": None}
    assert check_source_row(row) is row
    with pytest.raises(ValueError, match="drifted from SOURCE.*'image_bytes'"):
        check_source_row({**row, "image_bytes": b"x"})
