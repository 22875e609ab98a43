"""How a job's result rows become committed part files: one per shard, each written once.

In input order (stream_in_order): the rows come in input order (Ray Data's preserve_order) and a shard is
committed when the next one's first row arrives. In any order (stream_any_order, WebDataset input, whose sample
keys are unique within a tar): a shard is committed as soon as all of its rows are out, its row count known
before the job read it (pipeline/shards.py's inspect_shard); a repeated key (a batch re-run after its actor died)
is dropped, and a shard is never written twice. A shard's rows stay the Arrow batches they came in
(pipeline/rows.py's output_table makes the part file of them), never Python rows.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import JobConfig
from pipeline.metrics import Tally
from pipeline.shards import Shard
from pipeline.rows import check_columns, output_table
from pipeline.write import OutputDir


def shard_runs(batch: pa.Table):
    """(shard, rows) for each run of one shard's rows in a batch, in order."""
    shards = batch.column("shard")
    n = batch.num_rows
    if n == 0:
        return
    change = pc.not_equal(shards.slice(1), shards.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = [0, *(np.flatnonzero(change) + 1).tolist(), n]
    for a, b in zip(starts[:-1], starts[1:]):
        yield shards[a].as_py(), batch.slice(a, b - a)


def _commit(out: OutputDir, shard: str, table: pa.Table, written: list[str], total: int, tally: Tally) -> None:
    """Write a shard's part file, note when, and print the progress line."""
    out.commit(shard, table)
    written.append(shard)
    t = time.time() - tally.start
    tally.commits.append({"shard": shard, "t": round(t, 2), "rows": table.num_rows})
    print(f"[{t:7.1f}s] committed {shard}: {table.num_rows} rows | {len(written)}/{total} shards, "
          f"{tally.rows} rows, {tally.errors} errors, {tally.output_tokens / max(t, 1e-9):.1f} tokens/s",
          file=sys.stderr, flush=True)


def stream_in_order(ds: ray.data.Dataset, out: OutputDir, cfg: JobConfig, pending: list[Shard], tally: Tally) -> list[str]:
    carried = check_columns(cfg)
    written: list[str] = []
    current: str | None = None
    parts: list[pa.Table] = []

    def commit() -> None:
        _commit(out, current, output_table(current, parts, carried), written, len(pending), tally)

    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for shard, rows in shard_runs(batch):
            if shard != current:
                if current is not None:
                    commit()
                if shard in written:
                    raise RuntimeError(f"shard {shard} arrived out of order; refusing to write it twice")
                current, parts = shard, []
            tally.add(rows)
            parts.append(rows)
        tally.sample()
    if current is not None:
        commit()
    for shard in pending:  # shards with no rows at all still get their (empty) part file
        if shard.name not in written:
            current, parts = shard.name, []
            commit()
    return written


def stream_any_order(ds: ray.data.Dataset, out: OutputDir, cfg: JobConfig, pending: list[Shard],
                      counts: dict[str, int], tally: Tally) -> list[str]:
    """Commit each shard once all of its `counts[shard]` rows are out, whatever order the batches come in."""
    carried = check_columns(cfg)
    written: list[str] = []
    parts: dict[str, list[pa.Table]] = {}
    keys: dict[str, set[str]] = {}

    def commit(shard: str) -> None:
        keys.pop(shard, None)
        _commit(out, shard, output_table(shard, parts.pop(shard, []), carried), written, len(pending), tally)

    for shard in pending:  # shards with no rows at all: their (empty) part file at once
        if counts[shard.name] == 0:
            commit(shard.name)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for shard, rows in shard_runs(batch):
            if shard in written:
                raise RuntimeError(f"shard {shard} has more rows than the {counts[shard]} it was read with; "
                                   "refusing to write it twice")
            seen = keys.setdefault(shard, set())
            fresh = [k not in seen for k in rows.column("key").to_pylist()]
            if not all(fresh):  # a repeat of rows already out (a re-run batch): each row is written once
                rows = rows.filter(pa.array(fresh))
            seen.update(rows.column("key").to_pylist())
            tally.add(rows)
            parts.setdefault(shard, []).append(rows)
            if len(seen) >= counts[shard]:
                commit(shard)
        tally.sample()
    for shard in pending:  # a count that was too high (never expected): the rows that came are committed
        if shard.name not in written:
            commit(shard.name)
    return written
