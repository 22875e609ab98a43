"""Reading shards with Ray Data: WebDataset tars, parquet files, or a Hugging Face dataset.

Every source is turned into the same row shape before preprocessing, pipeline/rows.py's SOURCE:
    shard (str), key (str or None: assigned at commit time as "<shard>:<row index>"),
    image (bytes or None), image_path (str or None), fields (a dict of the row's other values: those the job
    needs, or all of them), error (str or None: why the input row itself is broken; preprocessing makes it the
    row's error).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Collection

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
        ds = ray.data.read_webdataset(paths, decoder=None, include_paths=False, filerename=_utf8_name)
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


def _utf8_name(name: str) -> str:
    """A tar member name as valid UTF-8 (undecodable bytes replaced): Ray puts names into Arrow blocks, and a
    non-UTF-8 name would fail the whole read."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _ShardLookup(dict):
    """Ray hands WebDataset rows their URL with or without the protocol; accept both."""

    def __missing__(self, url: str) -> str:
        return super().__getitem__(_norm(url))


def _sample_key(name: str) -> str | None:
    """The WebDataset sample a tar member belongs to, as Ray's reader groups them: the member's path up to the
    first dot of its file name (None: a name without an extension, which the reader skips)."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", _utf8_name(name))
    return match.group(1) if match else None


def inspect_shard(shard: Shard, fmt: str) -> tuple[str | None, int | None]:
    """(why the shard cannot be read or None, how many rows it holds or None where that is not cheap to know).

    Checked before the job reads anything, so one bad shard is reported instead of failing the whole read:
    a tar's member headers and sizes are walked (data is skipped), a parquet file's footer is parsed. The row
    count (a parquet file's, or a tar's runs of members sharing a sample key, as Ray's reader groups them) lets
    the driver commit a shard as soon as all its rows are out, in any order."""
    import tarfile

    import pyarrow.parquet as pq

    if fmt not in ("webdataset", "parquet"):
        return None, None
    try:
        fs, path = fsspec.core.url_to_fs(shard.path)
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            if fmt == "parquet":
                return None, pq.ParquetFile(f).metadata.num_rows
            with tarfile.open(fileobj=f, mode="r:") as tar:
                members = tar.getmembers()
            if size > 0 and not members:
                return "unreadable shard: no tar members", None
            cut = next((m.name for m in members if m.offset_data + m.size > size), None)
            if cut is not None:
                return f"unreadable shard: truncated tar (member {cut!r} runs past the end of the file)", None
            last = members[-1]
            if size < last.offset_data + -(-last.size // 512) * 512 + 1024:  # the end-of-archive marker is missing
                return f"unreadable shard: truncated tar (it ends after member {last.name!r} without an end marker)", None
            keys = [k for m in members if m.isfile() and (k := _sample_key(m.name)) is not None]
            return None, sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])
    except Exception as e:  # noqa: BLE001 - any failure to read is the reason
        return f"unreadable shard: {type(e).__name__}: {' '.join(str(e).split())[:200]}", None
