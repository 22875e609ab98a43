"""Writing demo shards from the synthetic corpus (scenes.corpus) as WebDataset tars or parquet files.

Each row: key, image (PNG), question, task, answer (the ground truth). WebDataset members are
<key>.png, <key>.txt (the question) and <key>.json ({"question", "task", "answer"}).
"""
from __future__ import annotations

import io
import json
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from scenes import corpus


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_demo_data(output_dir: str, seed: int = corpus.SPLIT_SEEDS["test"], num_samples: int = 64,
                    fmt: str = "webdataset", rows_per_shard: int = 32, tasks: list[str] | None = None) -> list[str]:
    """Write num_samples rows in shards of rows_per_shard; returns the shard URLs."""
    if fmt not in ("webdataset", "parquet"):
        raise ValueError(f"--format: expected webdataset or parquet, got {fmt!r}")
    fs, root = fsspec.core.url_to_fs(output_dir)
    fs.makedirs(root, exist_ok=True)
    paths = []
    for shard_index, start in enumerate(range(0, num_samples, rows_per_shard)):
        rows = []
        for i in range(start, min(start + rows_per_shard, num_samples)):
            task = tasks[i % len(tasks)] if tasks else None
            s = corpus.sample(seed, i, task=task)
            rows.append({"key": s.key, "image": corpus.encode_png(s.image), "question": s.question,
                         "task": s.task, "answer": s.answer})
        suffix = "tar" if fmt == "webdataset" else "parquet"
        path = f"{root.rstrip('/')}/shard-{shard_index:05d}.{suffix}"
        with fs.open(path, "wb") as f:
            if fmt == "webdataset":
                with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                    for r in rows:
                        meta = {"question": r["question"], "task": r["task"], "answer": r["answer"]}
                        _tar_member(tar, f"{r['key']}.png", r["image"])
                        _tar_member(tar, f"{r['key']}.txt", r["question"].encode())
                        _tar_member(tar, f"{r['key']}.json", json.dumps(meta).encode())
            else:
                pq.write_table(pa.Table.from_pylist(rows), f, compression="zstd")
        paths.append(fs.unstrip_protocol(path))
    return paths
