"""Rows that kill the worker, isolated. A row whose processing kills the generate actor's process (a native crash,
the OOM killer, resources.memory_per_actor) would otherwise be retried forever: Ray Data restarts the actor and
re-runs the same batch on it (max_restarts and max_task_retries are -1), and it dies again.

The generate actor notes each range of a batch's rows before it runs it, and that it finished after; a range
begun and never finished is a death that happened while it ran, and the notes outlive the process (a
WorkerDeaths actor, one per job). When Ray re-runs the batch on the restarted actor:
- the whole batch runs again while it has killed the worker at most `retries` times (a death may be the node's,
  not the rows');
- then it is split in halves, and a part that has killed the worker once is split again, so each death halves
  the rows under suspicion;
- a single row that has killed the worker is not run again: it is written as an error row, "worker died N times
  on this row" (N: the deaths while it was in flight).
Every other row comes out once, from the run that finished it. A batch of B rows costs retries + 1 + log2(B)
deaths at most (each one an actor restart, with its model load).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa


class WorkerDeaths:
    """The notes, kept apart from the workers (a Ray actor with no resources): per batch, per range of its rows,
    how many times it was begun and finished."""

    def __init__(self):
        self.begun: dict[tuple[str, int, int], int] = {}
        self.finished: dict[tuple[str, int, int], int] = {}

    def deaths(self, batch: str, a: int, b: int) -> int:
        key = (batch, a, b)
        return self.begun.get(key, 0) - self.finished.get(key, 0)

    def begin(self, batch: str, a: int, b: int, limit: int) -> int:
        """The deaths of rows [a, b) so far; the range is noted as begun when there are fewer than `limit`."""
        deaths = self.deaths(batch, a, b)
        if deaths < limit:
            self.begun[(batch, a, b)] = self.begun.get((batch, a, b), 0) + 1
        return deaths

    def finish(self, batch: str, a: int, b: int) -> None:
        self.finished[(batch, a, b)] = self.finished.get((batch, a, b), 0) + 1

    def row_deaths(self, batch: str, row: int) -> int:
        """The deaths while row `row` was in flight, in any range."""
        return sum(self.deaths(*key) for key in self.begun if key[0] == batch and key[1] <= row < key[2])


def batch_id(batch: pa.Table) -> str:
    """The same id for the same batch when Ray re-runs it: a hash of its rows' shards, keys and token ids."""
    h = hashlib.sha1()
    for name in ("shard", "key", "error"):
        h.update(repr(batch.column(name).to_pylist()).encode())
    for chunk in batch.column("input_ids").chunks:
        h.update(np.diff(np.asarray(chunk.offsets)).tobytes())
        h.update(chunk.flatten().to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()
