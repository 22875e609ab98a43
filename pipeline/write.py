"""The output directory: one parquet file per input shard, committed atomically, plus metrics.json and _SUCCESS.

A shard is written to `_tmp/` under a unique name and then renamed to `part-<shard>.parquet`, so a
reader never sees half a file and a rerun can trust every part file it finds: committed shards are
skipped, never written twice.

`_LOCK` keeps two runs from writing one output at once (a scheduled rerun starting while the last run is
still going). It names its holder (host, pid) and carries a heartbeat the holder refreshes; a lock whose
holder is gone (its pid is dead on this host, or its heartbeat is older than `output.lock_stale_s`) is
taken over, so a run killed with SIGKILL does not block the next one for long.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
LOCK = "_LOCK"


class OutputLocked(RuntimeError):
    """Another live run holds the output's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    def lock(self, stale_s: float) -> None:
        """Take the output's lock (raises OutputLocked if a live run holds it) and keep its heartbeat fresh."""
        path = self._path(LOCK)
        self.fs.makedirs(self.root, exist_ok=True)
        if self.fs.exists(path):
            held = self._read_lock()
            if held is not None and not self._stale(held, stale_s):
                age = time.time() - held.get("heartbeat", 0)
                raise OutputLocked(f"output.path: {self.url} is being written by another run (host {held.get('host')}, "
                                   f"pid {held.get('pid')}, heartbeat {age:.0f}s ago); wait for it to finish, or "
                                   f"delete {self.url}/{LOCK} if that run is gone")
            self.fs.rm(path)
        self._token = uuid.uuid4().hex
        self._write_lock(exclusive=True)
        time.sleep(0.05)  # object stores have no exclusive create: the last writer wins, and a loser sees it
        held = self._read_lock()
        if held is None or held.get("token") != self._token:
            raise OutputLocked(f"output.path: {self.url} was locked by another run starting at the same time")
        self._beat_stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(stale_s / 4,), daemon=True)
        self._beat.start()

    def unlock(self) -> None:
        if getattr(self, "_beat_stop", None) is None:
            return
        self._beat_stop.set()
        self._beat.join(timeout=5)
        self._beat_stop = None
        held = self._read_lock()
        if held is not None and held.get("token") == self._token:
            self.fs.rm(self._path(LOCK))

    def _read_lock(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._path(LOCK)))
        except (FileNotFoundError, ValueError):
            return None

    def _write_lock(self, exclusive: bool = False) -> None:
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self._token,
                           "heartbeat": time.time()})
        mode = "x" if exclusive and self.fs.protocol in ("file", ("file", "local")) else "w"
        try:
            with self.fs.open(self._path(LOCK), mode) as f:
                f.write(body)
        except FileExistsError:
            raise OutputLocked(f"output.path: {self.url} was locked by another run starting at the same time") from None

    def _heartbeat(self, every: float) -> None:
        while not self._beat_stop.wait(every):
            try:
                self._write_lock()
            except Exception:  # noqa: BLE001 - a missed beat only makes the lock look older
                pass

    @staticmethod
    def _stale(held: dict, stale_s: float) -> bool:
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
            return True
        return time.time() - float(held.get("heartbeat", 0)) > stale_s

    def committed(self) -> set[str]:
        if not self.fs.exists(self.root):
            return set()
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        return {n[len(PART_PREFIX):-len(PART_SUFFIX)] for n in names if n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX)}

    def commit(self, shard: str, table: pa.Table) -> None:
        """Write a shard's part file (pipeline/rows.py's output_table) and rename it into place."""
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

    def finish(self, complete: bool = True) -> None:
        if self.fs.exists(self._path("_tmp")):
            self.fs.rm(self._path("_tmp"), recursive=True)
        if complete:
            with self.fs.open(self._path("_SUCCESS"), "w") as f:
                f.write("")
