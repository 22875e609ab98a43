"""Which shards a job reads, and whether each can be read: paths and globs expanded into named shards, the input
format told from their suffixes, and each shard inspected (a tar's member headers, a parquet footer) before
the job reads a row, so one bad shard is reported instead of failing the whole read."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

import fsspec

from pipeline.config import ConfigError
from pipeline.config_sections import InputConfig

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


def utf8_name(name: str) -> str:
    """A tar member name as valid UTF-8 (undecodable bytes replaced): Ray puts names into Arrow blocks, and a
    non-UTF-8 name would fail the whole read."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _sample_key(name: str) -> str | None:
    """The WebDataset sample a tar member belongs to, as Ray's reader groups them: the member's path up to the
    first dot of its file name (None: a name without an extension, which the reader skips)."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", utf8_name(name))
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
