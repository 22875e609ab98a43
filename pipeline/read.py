"""Reading shards with Ray Data: WebDataset tars, parquet files, or a Hugging Face dataset.

Every source is turned into the same row shape before preprocessing:
    shard (str), key (str or None: assigned at commit time as "<shard>:<row index>"),
    image (bytes or None), image_path (str or None), fields (JSON of the row's other values).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import fsspec
import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from pipeline.config import ConfigError, InputConfig

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_FORMAT_BY_SUFFIX = {".tar": "webdataset", ".parquet": "parquet"}


@dataclass(frozen=True)
class Shard:
    name: str  # names the output file part-<name>.parquet; unique within a job
    path: str  # the full URL, as fsspec resolves it


def _stem(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar", ".parquet"):
        base = base.removesuffix(suffix)
    return base


def list_shards(cfg: InputConfig) -> list[Shard]:
    """Expand paths and globs (any fsspec URL) into a sorted, de-duplicated list of shards."""
    if resolve_format(cfg) == "hf":
        return [Shard(name=_stem(p), path=p) for p in cfg.paths]
    urls: list[str] = []
    for pattern in cfg.paths:
        fs, _, _ = fsspec.get_fs_token_paths(pattern)
        matches = fs.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise ConfigError(f"input.paths: nothing matches {pattern}")
        for m in sorted(matches):
            if fs.isdir(m):
                found = sorted(f for f in fs.find(m) if f.endswith((".tar", ".parquet")))
                if not found:
                    raise ConfigError(f"input.paths: no .tar or .parquet files under {pattern}")
                urls += [fs.unstrip_protocol(f) for f in found]
            elif fs.exists(m):
                urls.append(fs.unstrip_protocol(m))
            else:
                raise ConfigError(f"input.paths: {m} does not exist")
    urls = list(dict.fromkeys(urls))
    names = [_stem(u) for u in urls]
    shards = []
    for url, name in zip(urls, names):
        if names.count(name) > 1:  # same file name in two folders: keep both, apart, stably across runs
            name = f"{name}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"
        shards.append(Shard(name=name, path=url))
    return shards


def resolve_format(cfg: InputConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    suffixes = {os.path.splitext(p.rstrip("*"))[1] for p in cfg.paths}
    formats = {_FORMAT_BY_SUFFIX.get(s) for s in suffixes}
    if len(formats) == 1 and None not in formats:
        return formats.pop()
    raise ConfigError("input.format: cannot tell the format from the paths; set webdataset, parquet or hf")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _fields_json(fields: dict) -> str:
    return json.dumps({k: _plain(v) for k, v in fields.items()}, default=str)


def _webdataset_row(row: dict, cfg: InputConfig, shard_of: dict[str, str]) -> dict:
    image = None
    wanted = [cfg.image_column] if cfg.image_column else list(IMAGE_SUFFIXES)
    for suffix in wanted:
        if row.get(suffix) is not None:
            image = bytes(row[suffix])
            break
    fields: dict[str, Any] = {}
    if row.get("json") is not None:
        try:
            parsed = json.loads(bytes(row["json"]).decode("utf-8"))
            if isinstance(parsed, dict):
                fields.update(parsed)
        except (UnicodeDecodeError, json.JSONDecodeError):
            fields["__json_error__"] = "the .json member is not valid UTF-8 JSON"
    for k, v in row.items():
        if k.startswith("__") or k == "json" or k in IMAGE_SUFFIXES:
            continue
        fields.setdefault(k, _plain(v))
    path = fields.get(cfg.image_path_column) if cfg.image_path_column else None
    return {
        "shard": shard_of[row["__url__"]],
        "key": str(fields[cfg.id_column]) if cfg.id_column and fields.get(cfg.id_column) is not None else row["__key__"],
        "image": image,
        "image_path": path,
        "fields": _fields_json(fields),
    }


def table_row(row: dict, cfg: InputConfig, shard: str) -> dict:
    """A parquet, Hugging Face or user Dataset row in the common shape; every other column goes to fields."""
    image_column = cfg.image_column or "image"
    image = row.get(image_column)
    path = row.get(cfg.image_path_column) if cfg.image_path_column else None
    if isinstance(image, dict):  # a Hugging Face Image feature: {"bytes": ..., "path": ...}
        path = path or image.get("path")
        image = image.get("bytes")
    elif isinstance(image, np.ndarray):  # decoded pixels (e.g. ray.data.read_images): re-encode losslessly
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        image = buf.getvalue()
    fields = {k: v for k, v in row.items() if k != image_column}
    key = row.get(cfg.id_column) if cfg.id_column else None
    return {
        "shard": shard,
        "key": None if key is None else str(key),
        "image": bytes(image) if image is not None else None,
        "image_path": None if path is None else str(path),
        "fields": _fields_json(fields),
    }


def _parquet_row(row: dict, cfg: InputConfig, shard_of: dict[str, str]) -> dict:
    return table_row(row, cfg, shard_of[_norm(row.pop("path"))])  # `path`: added by include_paths


def _hf_row(row: dict, cfg: InputConfig) -> dict:
    return table_row(row, cfg, row.pop("__shard__"))


def _norm(path: str) -> str:
    return path.split("://", 1)[-1].lstrip("/")


def read_shards(cfg: InputConfig, shards: list[Shard]) -> tuple[ray.data.Dataset, Callable[[dict], dict]]:
    """One Dataset over the given shards, in shard order, and the function that normalises its rows
    to the common row shape (applied by the preprocess stage, so both run as one fused task)."""
    fmt = resolve_format(cfg)
    paths = [s.path for s in shards]
    if fmt == "webdataset":
        ds = ray.data.read_webdataset(paths, decoder=None, include_paths=False)
        lookup = _ShardLookup({_norm(p): s.name for p, s in zip(paths, shards)})
        return ds, functools.partial(_webdataset_row, cfg=cfg, shard_of=lookup)
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths, include_paths=True)
        shard_of = {_norm(p): s.name for p, s in zip(paths, shards)}
        return ds, functools.partial(_parquet_row, cfg=cfg, shard_of=shard_of)
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
        return ds, functools.partial(_hf_row, cfg=cfg)
    raise ConfigError(f"input.format: unknown format {fmt}")


class _ShardLookup(dict):
    """Ray hands WebDataset rows their URL with or without the protocol; accept both."""

    def __missing__(self, url: str) -> str:
        return super().__getitem__(_norm(url))
