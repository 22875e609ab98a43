"""The generate stage's actor (colocated mode): a Ray Data UDF holding one engine (engine/loading.py), turning
preprocessed rows into result rows.

Rows that already carry an error pass straight through. A batch that fails as a whole (say, out of
memory) is split in halves and retried, down to single rows, so one bad row cannot sink its neighbours.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import replace

import pyarrow as pa
import torch

from actors.metrics import record_batch
from engine.config import EngineConfig
from engine.loading import make_engine
from engine.request import Request, Result, SamplingParams, error_result, one_line, shape_key, unpack_arrays

OUTPUT_SCHEMA = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("fields", pa.string()), ("text", pa.string()),
    ("finish_reason", pa.string()), ("num_prompt_tokens", pa.int32()), ("num_output_tokens", pa.int32()),
    ("num_drafted_tokens", pa.int32()), ("num_accepted_tokens", pa.int32()), ("error", pa.string()),
    ("generate_s", pa.float64()),
    # compression.evaluate, sampled rows only: reference tokens, how many the job's model agreed with
    # (teacher-forced), and whether the two greedy outputs are the same text
    ("eval_tokens", pa.int32()), ("eval_agreed", pa.int32()), ("eval_exact", pa.bool_()),
])


def evaluated(key: str, fraction: float) -> bool:
    """Whether a row is in compression.evaluate's sample: a stable hash of its key, not its position."""
    return zlib.crc32(key.encode()) < fraction * 2**32


class GenerateActor:
    def __init__(self, engine: EngineConfig, params: SamplingParams, evaluate: float | None = None):
        torch.set_num_threads(max(1, engine.threads))
        self.engine = make_engine(engine)
        self.params = params
        self.mixed_shapes = engine.backend != "hf"  # the specray engine batches images of any shape
        self.evaluate = evaluate
        # compression.evaluate: the uncompressed target, decoding plainly, is the reference
        self.reference = make_engine(replace(engine, drafter=None, compression=type(engine.compression)(),
                                             num_draft_tokens="auto")) if evaluate else None

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
        agreed = self.engine.agreement([reqs[j] for j in ok], [refs[j].token_ids for j in ok])
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
        rows = batch.to_pylist()  # pyarrow keeps nulls as None (numpy batches turn all-null columns into NaN)
        results: list[Result | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        requests: dict[int, Request] = {}
        for i, row in enumerate(rows):
            if row["error"] is not None:
                results[i] = error_result(row["error"])
                continue
            try:
                arrays = unpack_arrays(row["model_inputs"])
            except Exception as e:  # noqa: BLE001
                results[i] = error_result(f"bad model inputs: {one_line(e)}")
                continue
            requests[i] = Request(key=str(row["key"]), input_ids=list(row["input_ids"]), model_inputs=arrays)
            groups.setdefault(() if self.mixed_shapes else shape_key(arrays), []).append(i)
        t0 = time.perf_counter()
        for idx in groups.values():
            for i, result in zip(idx, self._run([requests[i] for i in idx])):
                results[i] = result
        per_row = (time.perf_counter() - t0) / max(1, len(requests))
        evals = self._evaluate(requests, results) if self.reference is not None else {}
        out = [{"shard": row["shard"], "key": row["key"], "fields": row["fields"], "text": r.text,
                "finish_reason": r.finish_reason, "num_prompt_tokens": row["num_prompt_tokens"],
                "num_output_tokens": r.num_output_tokens, "num_drafted_tokens": r.num_drafted_tokens,
                "num_accepted_tokens": r.num_accepted_tokens, "error": r.error,
                "generate_s": per_row if i in requests else 0.0,
                **dict(zip(("eval_tokens", "eval_agreed", "eval_exact"), evals.get(i, (None, None, None))))}
               for i, (row, r) in enumerate(zip(rows, results))]
        record_batch(out)  # Prometheus: rows ok/error, tokens, drafted, accepted (actors/metrics.py)
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)
