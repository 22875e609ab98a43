"""The generate stage's actor (colocated mode): a Ray Data UDF holding one engine (engine/loading.py), turning
a batch of preprocessed rows into result rows (both: actors/row_schemas.py), column by column in Arrow.

With model.drafter_training, the actor sends its finished rows to the drafter trainer and swaps in each new
drafter version between batches (actors/drafter_trainer.py); every row records the version it was drafted with.

Rows that already carry an error pass straight through. A batch that fails as a whole (say, out of
memory) is split in halves and retried, down to single rows, so one bad row cannot sink its neighbours.
A row that kills the process instead (a native crash, resources.memory_per_actor) is isolated across the
restarts Ray makes: actors/worker_deaths.py.
"""
from __future__ import annotations

import time

from actors.startup import StartupLog  # noqa: I001 - first: it notes when this process's imports began

import zlib
from dataclasses import replace

import pyarrow as pa
import ray
import torch

from actors.generate_rows import read_input_ids, read_tensors, result_table
from actors.memory_limit import enforce_memory_limit
from actors.metrics import record_batch
from actors.worker_deaths import batch_id
from engine.agreement import token_agreement
from engine.config import EngineConfig
from engine.loading import make_engine
from engine.request import Request, Result, SamplingParams, error_result, one_line, shape_key

IMPORTS_DONE = time.time()


def evaluated(key: str, fraction: float) -> bool:
    """Whether a row is in compression.evaluate's sample: a stable hash of its key, not its position."""
    return zlib.crc32(key.encode()) < fraction * 2**32


class GenerateActor:
    def __init__(self, engine: EngineConfig, params: SamplingParams, evaluate: float | None = None,
                 run_id: str | None = None, trainer=None, memory_limit: int | None = None, deaths=None,
                 death_retries: int = 1):
        """`memory_limit`: resources.memory_per_actor (bytes), enforced on this process; `deaths`: the job's
        WorkerDeaths actor, and `death_retries` (resources.worker_death_retries), which isolate a row that kills
        the process (actors/worker_deaths.py)."""
        if memory_limit:
            enforce_memory_limit(memory_limit)  # first: loading the model counts too
        self.deaths, self.death_retries = deaths, death_retries
        self.startup = StartupLog(run_id, IMPORTS_DONE)  # run_id: the job's, whose driver reports start-up phases
        torch.set_num_threads(max(1, engine.threads))
        self.engine = make_engine(engine)
        self.params = params
        self.mixed_shapes = engine.backend != "hf"  # the specray engine batches images of any shape
        self.evaluate = evaluate
        # compression.evaluate: the uncompressed target, decoding plainly, is the reference
        self.reference = make_engine(replace(engine, drafter=None, compression=type(engine.compression)(),
                                             num_draft_tokens="auto")) if evaluate else None
        self.updates = None
        if trainer is not None:
            from actors.drafter_trainer import DrafterUpdates
            self.updates = DrafterUpdates(trainer, self.engine)
        parity = getattr(getattr(self.engine, "target", None), "parity", None)  # the hf backend has none
        self.startup.loaded(parity["seconds"] if parity else None)

    def _evaluate(self, requests: dict[int, Request], results: list[Result | None]) -> dict[int, tuple[int, int, bool]]:
        """Greedy agreement with the uncompressed target on the sampled rows: {row: (tokens, agreed, exact)}."""
        picked = [i for i, r in requests.items() if results[i].error is None and evaluated(r.key, self.evaluate)]
        if not picked:
            return {}
        reqs = [requests[i] for i in picked]
        greedy = replace(self.params, temperature=0.0)
        refs = self.reference.generate(reqs, greedy)
        mine = [results[i] for i in picked] if self.params.temperature == 0 else self.engine.generate(reqs, greedy)
        ok = [j for j, r in enumerate(refs) if r.error is None and mine[j].error is None]
        agreed = token_agreement(self.engine.target, [reqs[j] for j in ok], [refs[j].token_ids for j in ok])
        return {picked[j]: (len(refs[j].token_ids), a, mine[j].text == refs[j].text) for j, a in zip(ok, agreed)}

    def _generate(self, requests: list[Request]) -> list[Result]:
        return self.engine.generate(requests, self.params)

    def _run(self, requests: list[Request]) -> list[Result]:
        try:
            return self._generate(requests)
        except Exception as e:  # noqa: BLE001 - split and retry; a single failing row becomes an error row
            if len(requests) == 1:
                return [error_result(one_line(e))]
            half = len(requests) // 2
            return self._run(requests[:half]) + self._run(requests[half:])

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data's call: the result rows of `batch`. (Yielding an actor's first rows apart does not make them
        reach the driver sooner: Ray Data buffers a task's output blocks until the task ends.)"""
        return self.run_batch(batch)

    def run_batch(self, batch: pa.Table) -> pa.Table:
        """The result rows of a batch of preprocessed rows, in order."""
        started = time.time()
        try:
            if getattr(self, "deaths", None) is None:
                return self._call(batch)
            return self._isolating(batch, batch_id(batch), 0, batch.num_rows, self.death_retries + 1)
        finally:
            if getattr(self, "startup", None) is not None:
                stats = getattr(self.engine, "stats", None)  # the hf backend has none
                self.startup.batch(started, {"seconds": stats.compile_s, "buckets": stats.compile_buckets}
                                   if stats is not None and stats.compile_buckets else None)

    def _isolating(self, batch: pa.Table, bid: str, a: int, b: int, limit: int) -> pa.Table:
        """The result rows of rows [a, b) of a batch, noted as begun and finished with the job's WorkerDeaths;
        a range that killed the worker `limit` times is split, and a row that did is an error row."""
        deaths = ray.get(self.deaths.begin.remote(bid, a, b, limit))
        if deaths < limit:
            out = self._call(batch.slice(a, b - a))
            ray.get(self.deaths.finish.remote(bid, a, b))
            return out
        if b - a == 1:
            n = ray.get(self.deaths.row_deaths.remote(bid, a))
            row = batch.slice(a, 1)
            return self._call(row.set_column(row.schema.get_field_index("error"), "error",
                                             pa.array([f"worker died {n} times on this row"], pa.string())))
        mid = (a + b) // 2
        return pa.concat_tables([self._isolating(batch, bid, a, mid, 1), self._isolating(batch, bid, mid, b, 1)])

    def _call(self, batch: pa.Table) -> pa.Table:
        errors = batch.column("error").to_pylist()
        keys = batch.column("key").to_pylist()
        results: list[Result | None] = [error_result(e) if e is not None else None for e in errors]
        groups: dict[tuple, list[int]] = {}
        requests: dict[int, Request] = {}
        todo = [i for i, e in enumerate(errors) if e is None]
        if todo:
            ids, tensors = read_input_ids(batch.column("input_ids")), read_tensors(batch.column("model_inputs"))
        for i in todo:
            if not isinstance(tensors[i], dict):
                why = "the row has none" if tensors[i] is None else one_line(tensors[i])
                results[i] = error_result(f"bad model inputs: {why}")
                continue
            requests[i] = Request(key=str(keys[i]), input_ids=ids[i], model_inputs=tensors[i])
            groups.setdefault(() if self.mixed_shapes else shape_key(tensors[i]), []).append(i)
        t0 = time.perf_counter()
        for idx in groups.values():
            for i, result in zip(idx, self._run([requests[i] for i in idx])):
                results[i] = result
        per_row = (time.perf_counter() - t0) / max(1, len(requests))
        version = getattr(self.engine, "drafter_version", None)  # the drafter these rows were drafted with
        updates = getattr(self, "updates", None)
        if updates is not None:
            updates.send([requests[i] for i in requests], [results[i] for i in requests])
            updates.poll()  # a newer version, if one is out, serves the next batch
        evals = self._evaluate(requests, results) if self.reference is not None else {}
        columns = {name: [getattr(r, name) for r in results] for name in (
            "text", "finish_reason", "num_output_tokens", "num_drafted_tokens", "num_accepted_tokens", "error")}
        columns["generate_s"] = [per_row if i in requests else 0.0 for i in range(len(results))]
        columns["drafter_version"] = [version if i in requests and updates is not None else None
                                      for i in range(len(results))]
        for j, name in enumerate(("eval_tokens", "eval_agreed", "eval_exact")):
            columns[name] = [evals[i][j] if i in evals else None for i in range(len(results))]
        record_batch([vars(r) for r in results])  # Prometheus: rows ok/error, tokens, drafted, accepted
        return result_table(batch, columns)
