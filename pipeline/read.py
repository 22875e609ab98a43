"""Reading shards with Ray Data: WebDataset tars, parquet files, or a Hugging Face dataset.

Every source is turned into the same row shape before preprocessing, actors/row_schemas.py's SOURCE:
    shard (str), key (str or None: assigned at commit time as "<shard>:<row index>"),
    image (bytes or None), image_path (str or None), fields (a dict of the row's other values: those the job
    needs, or all of them), error (str or None: why the input row itself is broken; preprocessing makes it the
    row's error).
"""
from __future__ import annotations

import functools
import io
import json
from typing import Any, Callable, Collection

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from pipeline.config import ConfigError
from pipeline.config_sections import InputConfig
from pipeline.shards import Shard, resolve_format, utf8_name

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


def _plain(value: Any) -> Any:
    """A value that Arrow and the prompt can both carry: bytes that are not UTF-8, and text with unpaired
    surrogates (a .json escape like "\\ud800"), become None, which the prompt reports by column name."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return value if _is_utf8(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return value


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _fields(raw: dict, columns: Collection[str] | None) -> dict:
    """The row's values the job needs (all where columns is None), made plain; a column it lacks stays absent."""
    names = raw if columns is None else (c for c in columns if c in raw)
    return {k: _plain(raw[k]) for k in names}


def _unsafe_key(key: str) -> str | None:
    """Why a WebDataset key (a tar member's name less its extensions) is refused, or None. Nothing is ever
    written under a key, but an absolute or `..` name marks a hostile archive, and a key that is not UTF-8
    cannot be written to the output at all."""
    if not _is_utf8(key):
        return "not UTF-8"
    if key.startswith(("/", "\\")) or ".." in key.replace("\\", "/").split("/"):
        return "an absolute path or one with '..', unsafe to extract"
    return None


def _webdataset_row(row: dict, cfg: InputConfig, shard_of: dict[str, str],
                    columns: Collection[str] | None = None) -> dict:
    """A WebDataset sample (members grouped by Ray by key) in the common shape; a broken sample gets an error."""
    errors = []
    key = row["__key__"]
    why = _unsafe_key(key)
    if why:
        key = key.encode("utf-8", "backslashreplace").decode("utf-8")  # printable, and Arrow can write it
        errors.append(f"tar member name {key!r}: {why}")
    # the sample's members; Ray builds a block through pandas, so a member that another sample in the block
    # has and this one lacks arrives as NaN: anything but bytes is an absent member
    members = {k: bytes(v) for k, v in row.items()
               if not k.startswith("__") and isinstance(v, (bytes, bytearray, memoryview))}
    wanted = [cfg.image_column] if cfg.image_column else list(IMAGE_SUFFIXES)
    image = next((members[suffix] for suffix in wanted if suffix in members), None)
    fields: dict[str, Any] = {}
    if "json" in members:
        try:
            parsed = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
            errors.append("the .json member is not valid UTF-8 JSON")
        else:
            if isinstance(parsed, dict):
                fields.update(parsed)
            else:
                errors.append(f"the .json member is a JSON {type(parsed).__name__}, not an object")
    for k, v in members.items():
        if k != "json" and k not in IMAGE_SUFFIXES:
            fields.setdefault(k, v)
    path = _plain(fields.get(cfg.image_path_column)) if cfg.image_path_column else None
    key_value = _plain(fields.get(cfg.id_column)) if cfg.id_column else None
    if image is None and path is None:
        have = ", ".join(sorted(members)) or "none"
        errors.append(f"the row has no image (no {' or '.join(wanted)} member; members: {have})")
    return {
        "shard": shard_of[row["__url__"]],
        "key": key if key_value is None else str(key_value),
        "image": image,
        "image_path": None if path is None else str(path),
        "fields": _fields(fields, columns),
        "error": "; ".join(errors) or None,
    }


def table_row(row: dict, cfg: InputConfig, shard: str, columns: Collection[str] | None = None) -> dict:
    """A parquet, Hugging Face or user Dataset row in the common shape; its other columns go to fields (those
    named in `columns`, or all of them).
    An image column of the wrong type (an int, a string) is the row's error, never a crash or bytes(n)."""
    image_column = cfg.image_column or "image"
    image = row.get(image_column)
    path = row.get(cfg.image_path_column) if cfg.image_path_column else None
    error = None
    if isinstance(image, dict):  # a Hugging Face Image feature: {"bytes": ..., "path": ...}
        path = path or image.get("path")
        image = image.get("bytes")
    elif isinstance(image, np.ndarray):  # decoded pixels (e.g. ray.data.read_images): re-encode losslessly
        try:
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            image = buf.getvalue()
        except Exception as e:  # noqa: BLE001 - e.g. a float or 4-D array
            image, error = None, f"image: the {image.dtype} array of shape {image.shape} is not an image ({e})"
    if image is not None and not isinstance(image, (bytes, bytearray, memoryview)):
        image, error = None, f"image: column {image_column!r} holds {type(image).__name__}, not image bytes"
    fields = _fields({k: v for k, v in row.items() if k != image_column}, columns)
    key = row.get(cfg.id_column) if cfg.id_column else None
    return {
        "shard": shard,
        "key": None if key is None else str(_plain(key)),
        "image": bytes(image) if image is not None else None,
        "image_path": None if path is None else str(path),
        "fields": fields,
        "error": error,
    }


def _parquet_row(row: dict, cfg: InputConfig, shard_of: dict[str, str], columns: Collection[str] | None) -> dict:
    return table_row(row, cfg, shard_of[_norm(row.pop("path"))], columns)  # `path`: added by include_paths


def _hf_row(row: dict, cfg: InputConfig, columns: Collection[str] | None) -> dict:
    return table_row(row, cfg, row.pop("__shard__"), columns)


def _norm(path: str) -> str:
    return path.split("://", 1)[-1].lstrip("/")


def read_shards(cfg: InputConfig, shards: list[Shard], columns: Collection[str] | None = None
                ) -> tuple[ray.data.Dataset, Callable[[dict], dict]]:
    """One Dataset over the given shards, in shard order, and the function that normalises its rows
    to the common row shape (applied by the preprocess stage, so both run as one fused task). `columns`: the
    input columns the job needs in `fields` (None: all)."""
    import ray.data  # imported once a job reads (the driver's first seconds go to starting Ray)

    fmt = resolve_format(cfg)
    paths = [s.path for s in shards]
    if fmt == "webdataset":
        ds = ray.data.read_webdataset(paths, decoder=None, include_paths=False, filerename=utf8_name)
        lookup = _ShardLookup({_norm(p): s.name for p, s in zip(paths, shards)})
        return ds, functools.partial(_webdataset_row, cfg=cfg, shard_of=lookup, columns=columns)
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths, include_paths=True)
        shard_of = {_norm(p): s.name for p, s in zip(paths, shards)}
        return ds, functools.partial(_parquet_row, cfg=cfg, shard_of=shard_of, columns=columns)
    if fmt == "hf":
        import datasets

        parts = []
        for shard in shards:
            try:
                hf = datasets.load_from_disk(shard.path)
            except FileNotFoundError:
                hf = datasets.load_dataset(shard.path, split=cfg.hf_split)
            if isinstance(hf, datasets.DatasetDict):
                hf = hf[cfg.hf_split]
            tag = functools.partial(lambda batch, name: pa.array([name] * len(batch)), name=shard.name)
            parts.append(ray.data.from_huggingface(hf).add_column("__shard__", tag, batch_format="pyarrow"))
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        return ds, functools.partial(_hf_row, cfg=cfg, columns=columns)
    raise ConfigError(f"input.format: unknown format {fmt}")


class _ShardLookup(dict):
    """Ray hands WebDataset rows their URL with or without the protocol; accept both."""

    def __missing__(self, url: str) -> str:
        return super().__getitem__(_norm(url))
