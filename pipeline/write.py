"""The output directory: one parquet file per input shard, committed atomically, plus metrics.json and _SUCCESS.

A shard is written to `_tmp/` under a unique name and then renamed to `part-<shard>.parquet`, so a
reader never sees half a file and a rerun can trust every part file it finds: committed shards are
skipped, never written twice.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("text", pa.string()),
    ("finish_reason", pa.string()),
    ("num_prompt_tokens", pa.int32()),
    ("num_output_tokens", pa.int32()),
    ("num_drafted_tokens", pa.int32()),
    ("num_accepted_tokens", pa.int32()),
    ("error", pa.string()),
])
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"


class OutputDir:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def part_name(self, shard: str) -> str:
        return f"{PART_PREFIX}{shard}{PART_SUFFIX}"

    def prepare(self, overwrite: bool) -> None:
        """Create the directory; drop leftovers of a killed run; with overwrite, drop everything we wrote."""
        self.fs.makedirs(self.root, exist_ok=True)
        if self.fs.exists(self._path("_tmp")):
            self.fs.rm(self._path("_tmp"), recursive=True)
        doomed = ["_SUCCESS"] + (["metrics.json"] + [self.part_name(s) for s in self.committed()] if overwrite else [])
        for name in doomed:
            if self.fs.exists(self._path(name)):
                self.fs.rm(self._path(name))

    def committed(self) -> set[str]:
        if not self.fs.exists(self.root):
            return set()
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        return {n[len(PART_PREFIX):-len(PART_SUFFIX)] for n in names if n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX)}

    def commit(self, shard: str, rows: list[dict[str, Any]], extra_columns: list[str]) -> None:
        columns = {f.name: [r[f.name] for r in rows] for f in OUTPUT_SCHEMA}
        table = pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)
        for name in extra_columns:
            table = table.append_column(name, pa.array([r.get(name) for r in rows]))
        tmp = self._path(f"_tmp/{self.part_name(shard)}.{uuid.uuid4().hex}")
        self.fs.makedirs(self._path("_tmp"), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        self.fs.mv(tmp, self._path(self.part_name(shard)))

    def count_rows(self) -> int:
        total = 0
        for shard in self.committed():
            with self.fs.open(self._path(self.part_name(shard)), "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def write_json(self, name: str, value: dict) -> None:
        with self.fs.open(self._path(name), "w") as f:
            json.dump(value, f, indent=1, default=str)

    def finish(self) -> None:
        if self.fs.exists(self._path("_tmp")):
            self.fs.rm(self._path("_tmp"), recursive=True)
        with self.fs.open(self._path("_SUCCESS"), "w") as f:
            f.write("")
