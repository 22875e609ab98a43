"""Running a job: shards in, one committed parquet file per shard out, then metrics.json and _SUCCESS.

The driver takes the generate stage's output batches in whatever order they finish (one slow batch holds up
nothing behind it) and commits a shard as soon as all of its rows are out: each shard's row count is known
before the job reads it (pipeline/read.py's inspect_shard). Each row is written once: a shard's rows are
counted by key (WebDataset sample keys, unique within a tar), a repeated key (a batch re-run after its actor
died) is dropped, and a shard is never written twice. Where keys are not unique by construction (parquet and
hf rows are keyed by position at commit, or by a user's id column), or with output.commit_order: input, the
output comes in input order (Ray Data's preserve_order) and a shard is committed when the next one's first
row arrives.
The driver keeps a shard's result rows as the Arrow batches they came in (pipeline/rows.py's output_table
makes the part file of them), never as Python rows. A killed job loses only the shards it had not committed;
the rerun skips every committed shard.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import import_module, metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.startup import collect, phases
from pipeline.config import ConfigError, JobConfig, dump, load_config
from pipeline.preprocess import prompt_columns
from pipeline.read import Shard, inspect_shard, list_shards, read_shards, resolve_format
from pipeline.rows import check_columns, output_table
from pipeline.write import OutputDir, OutputLocked


class UnreadableShard(RuntimeError):
    """A shard cannot be read and input.on_unreadable is fail."""


@dataclass
class JobResult:
    output_path: str
    rows: int
    errors: int
    output_tokens: int
    wall_s: float
    shards_written: list[str]
    shards_skipped: list[str]
    metrics: dict = field(repr=False, default_factory=dict)
    shards_unreadable: dict[str, str] = field(default_factory=dict)  # shard -> why; not committed, retried next run

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


class _Tally:
    """Running totals over output rows, for metrics.json."""

    def __init__(self):
        self.rows = self.errors = self.prompt_tokens = self.output_tokens = 0
        self.drafted = self.accepted = 0
        self.generate_s = 0.0
        self.reasons: dict[str, int] = {}
        self.finish: dict[str, int] = {}
        self.eval_rows = self.eval_tokens = self.eval_agreed = self.eval_exact = 0
        self.start = time.time()
        self.first_row: float | None = None  # when the first result row reached the driver
        self.commits: list[dict] = []  # {shard, t (s since the job began), rows}: when each shard was committed
        self.timeline: list[dict] = []  # cumulative counts, sampled at most once a second (report.html's plots)
        self.versions: dict[int, dict] = {}  # model.drafter_training: per drafter version, its rows' counts

    def sample(self, final: bool = False) -> None:
        t = time.time() - self.start
        if final or not self.timeline or t - self.timeline[-1]["t"] >= 1.0:
            self.timeline.append({"t": round(t, 2), "rows": self.rows, "errors": self.errors,
                                  "output_tokens": self.output_tokens, "drafted": self.drafted,
                                  "accepted": self.accepted, "drafter_version": max(self.versions, default=None)})

    def add_evaluation(self, batch: pa.Table) -> None:
        tokens = batch.column("eval_tokens")
        if tokens.null_count < len(tokens):
            self.eval_rows += len(tokens) - tokens.null_count
            self.eval_tokens += _sum(tokens)
            self.eval_agreed += _sum(batch.column("eval_agreed"))
            self.eval_exact += _sum(batch.column("eval_exact").cast(pa.int64()))

    def compression(self, cfg: JobConfig) -> dict:
        """metrics.json's compression: the settings, and with compression.evaluate the measured agreement."""
        c = cfg.compression
        out = {"weights": c.weights, "group_size": c.group_size if c.weights == "int4" else None,
               "apply_to": c.apply_to, "visual_tokens": c.visual_tokens.model_dump(),
               "self_speculation": cfg.model.drafter if (cfg.model.drafter or "").startswith("self-") else None,
               "evaluation": None}
        if c.evaluate:
            out["evaluation"] = {
                "sample_fraction": c.evaluate_fraction, "rows": self.eval_rows,
                "token_agreement": self.eval_agreed / self.eval_tokens if self.eval_tokens else None,
                "exact_match_agreement": self.eval_exact / self.eval_rows if self.eval_rows else None,
                "reference": "the uncompressed target, greedy, plain decoding; token agreement is teacher-forced"}
        return out

    def add(self, batch: pa.Table) -> None:
        """Count a batch of result rows (actors/generate_rows.py's RESULT)."""
        if self.first_row is None and batch.num_rows:
            self.first_row = time.time()
        self.rows += batch.num_rows
        self.prompt_tokens += _sum(batch.column("num_prompt_tokens"))
        self.output_tokens += _sum(batch.column("num_output_tokens"))
        self.drafted += _sum(batch.column("num_drafted_tokens"))
        self.accepted += _sum(batch.column("num_accepted_tokens"))
        self.generate_s += _sum(batch.column("generate_s"))
        for value in pc.value_counts(batch.column("finish_reason")).to_pylist():
            self.finish[value["values"]] = self.finish.get(value["values"], 0) + value["counts"]
        errors = batch.column("error")
        if errors.null_count < len(errors):
            for error in pc.drop_null(errors).to_pylist():
                self.errors += 1
                reason = error.split(":", 1)[0]
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.add_evaluation(batch)
        self.add_versions(batch)

    def add_versions(self, batch: pa.Table) -> None:
        versions = batch.column("drafter_version")
        if versions.null_count == len(versions):
            return
        t = round(time.time() - self.start, 2)
        columns = {c: batch.column(c).to_pylist() for c in ("num_output_tokens", "num_drafted_tokens",
                                                            "num_accepted_tokens")}
        for i, v in enumerate(versions.to_pylist()):
            if v is None:
                continue
            d = self.versions.setdefault(v, {"version": v, "rows": 0, "output_tokens": 0, "drafted": 0,
                                             "accepted": 0, "first_t": t})
            d["rows"] += 1
            d["output_tokens"] += columns["num_output_tokens"][i] or 0
            d["drafted"] += columns["num_drafted_tokens"][i] or 0
            d["accepted"] += columns["num_accepted_tokens"][i] or 0
            d["last_t"] = t

    def drafter_training(self, report: dict | None) -> dict:
        """metrics.json's drafter_training: acceptance per drafter version (rows drafted with it) and the
        trainer's own record (steps, versions with their loss, events such as a lost trainer, where it saved)."""
        by_version = [dict(d, acceptance=d["accepted"] / d["drafted"] if d["drafted"] else None)
                      for _, d in sorted(self.versions.items())]
        return {"by_version": by_version, "trainer": report}


def _sum(column: pa.ChunkedArray) -> int | float:
    return pc.sum(column).as_py() or 0


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("specray", "ray", "torch", "transformers", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _ensure_ray(cfg: JobConfig) -> None:
    """Join the cluster (RAY_ADDRESS, e.g. under `ray job submit`), or start a local one.

    A local instance gets a few more logical CPUs than cores: the actors' CPU requests are
    reservations, and without headroom the read and preprocess tasks starve behind them.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    r, a = cfg.resources, cfg.autoscaler
    actors, resources = r.num_actors * r.cpus_per_actor, {}
    if r.mode == "disaggregated":  # room for the largest plan the budget allows
        targets = int(a.devices)
        drafters = a.max_drafters if a.drafter_cost == 0 else min(a.max_drafters, int(a.devices / a.drafter_cost))
        actors = targets * r.cpus_per_actor + drafters * a.drafter_cpus
        for name, amount in [*a.target_resources.items(), *a.drafter_resources.items()]:
            resources[name] = resources.get(name, 0) + amount * max(targets, drafters)  # one node has them all
    if cfg.model.drafter_training.enabled:
        actors += cfg.model.drafter_training.cpus
    cpus = max(os.cpu_count() or 1, math.ceil(actors + 2 * r.preprocess_cpus + 1))
    # logging_level: no "Started a local Ray instance" line; a bad model found meanwhile stays one line of stderr
    ray.init(num_cpus=cpus, resources=resources or None, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)


def run_job(config: str | Path | dict | JobConfig, overrides: list[str] | None = None,
            started: float | None = None) -> JobResult:
    """Run a job from a config (YAML path, dict or JobConfig); returns its JobResult. `started`: when the job
    began, if before this call (the command line passes its process's start, so that metrics.json's start-up
    phases count the imports and checks a user waits for too)."""
    start = time.time() if started is None else started
    cfg = load_config(config, overrides)
    cfg.check_job()
    check_columns(cfg)  # an output.columns entry that would shadow an output column: exit 2 before any work
    # A model the engine cannot run exactly: exit 2 before any work. The check imports transformers and loads the
    # processor (seconds of CPU), so it runs beside Ray's start; nothing is written before its answer.
    with ThreadPoolExecutor(1, thread_name_prefix="specray-checks") as checks:
        decoder = checks.submit(decoder_plan, cfg)
        checks.submit(import_module, "pipeline.stages")  # torch, Ray Data, the actors: beside Ray's start too
        out = OutputDir(cfg.output.path)
        try:
            out.lock(cfg.output.lock_stale_s)  # raises OutputLocked while another live run writes here
        except OutputLocked:
            decoder.result()  # a bad config is the first thing to say
            raise
        try:
            return _run_locked(cfg, out, start, decoder)
        finally:
            out.unlock()


def decoder_plan(cfg: JobConfig) -> dict:
    """Which decoder the job's target runs on and why (from its config alone: engine/support.py). A model that
    no specray decoder runs exactly, or whose processor cannot be loaded here, is a config error naming
    model.target: otherwise every row would fail the same way. So is one whose processor fails on a one-image
    prompt."""
    from engine.processor import check_processor
    from engine.support import check_model

    engine = cfg.engine()
    plan = {"kind": "hf generate", "reason": "decoding.backend: hf", "parity_check": False}
    if cfg.decoding.backend == "specray":
        try:
            p = check_model(engine.target, engine.trust_remote_code, engine.lean)
            plan = {"kind": p.kind, "reason": p.reason, "parity_check": engine.parity_check}
        except ValueError as e:
            raise ConfigError(f"model.target: {e}") from None
        except OSError:
            plan = {"kind": "unknown", "reason": "the target's config could not be read here", "parity_check": False}
    if Path(engine.target).is_dir():  # a hub id is left to the actors (the driver may not reach the hub)
        try:
            check_processor(engine.target, engine.trust_remote_code)
        except ValueError as e:  # whatever stops it would stop every row
            raise ConfigError(f"model.target: {e}") from None
    return plan


def _run_locked(cfg: JobConfig, out: OutputDir, start: float, checked: Future) -> JobResult:
    """`checked`: decoder_plan's answer, still coming; Ray starts meanwhile, the output is touched only after it."""
    shards = list_shards(cfg.input)
    done = set() if cfg.output.overwrite else out.committed()  # what out.prepare leaves committed
    pending = [s for s in shards if s.name not in done]
    skipped = [s.name for s in shards if s.name in done]
    fmt = resolve_format(cfg.input)
    inspected = {s.name: inspect_shard(s, fmt) for s in pending}
    bad = {name: why for name, (why, _) in inspected.items() if why is not None}
    if bad and cfg.input.on_unreadable == "fail":
        name, why = next(iter(bad.items()))
        checked.result()  # a bad config is the first thing to say
        raise UnreadableShard(f"shard {name}: {why} ({len(bad)} unreadable in all; input.on_unreadable is fail)")
    for name, why in bad.items():
        print(f"skipping shard {name}: {why}", file=sys.stderr, flush=True)
    pending = [s for s in pending if s.name not in bad]
    tally, written, pool_report, trainer_report = _Tally(), [], None, None
    tally.start = start
    ray_called = ray_ready = None
    run_id, any_order = uuid.uuid4().hex, False
    if pending:
        ray_called = time.time()
        _ensure_ray(cfg)
        ray_ready = time.time()
    decoder = checked.result()
    out.prepare(cfg.output.overwrite)
    if pending:
        from pipeline.stages import generate_stages, start_pools

        ctx = ray.data.DataContext.get_current()
        counts = {s.name: inspected[s.name][1] for s in pending}
        any_order = (cfg.output.commit_order == "any" and fmt == "webdataset" and cfg.input.id_column is None
                     and None not in counts.values())
        ctx.execution_options.preserve_order = not any_order
        # a block of carried values that share no Arrow type travels pickled (actors/generate_rows.py)
        ctx.enable_fallback_to_arrow_object_ext_type = True
        needed = prompt_columns(cfg.task.prompt) | set(check_columns(cfg))
        ds, normalise = read_shards(cfg.input, pending, needed)
        pools = start_pools(cfg) if cfg.resources.mode == "disaggregated" else None
        trainer = start_drafter_trainer(cfg, run_id)
        try:
            results = generate_stages(ds, cfg, normalise, pools, run_id=run_id, trainer=trainer)
            written = (_stream_any_order(results, out, cfg, pending, counts, tally) if any_order
                       else _stream(results, out, cfg, pending, tally))
        finally:
            if pools is not None:
                pool_report = ray.get(pools.shutdown.remote())
                ray.kill(pools)
            if trainer is not None:
                trainer_report = finish_drafter_trainer(trainer)
    wall = time.time() - start
    tally.sample(final=True)
    startup = phases(start, ray_called, ray_ready, tally.first_row, collect(run_id) if ray_ready is not None else [])
    metrics = {
        "rows": tally.rows,
        "errors": tally.errors,
        "errors_by_reason": tally.reasons,
        "finish_reasons": tally.finish,
        "prompt_tokens": tally.prompt_tokens,
        "output_tokens": tally.output_tokens,
        "drafted_tokens": tally.drafted,
        "accepted_tokens": tally.accepted,
        "acceptance_rate": tally.accepted / tally.drafted if tally.drafted else None,
        "wall_s": wall,
        "tokens_per_s": tally.output_tokens / wall if wall > 0 else 0.0,
        "stage_s": {"generate_actor_busy": tally.generate_s},
        "startup": startup,
        "commit_order": "any" if any_order else "input",  # any: each shard committed once all its rows are out
        "commits": tally.commits,  # [{shard, t (s since the job began), rows}], in commit order  # seconds: Ray, actor start, imports, model load, first batch; first output row
        "timeline": tally.timeline,  # [{t (s since the job began), cumulative rows, errors, output_tokens, drafted, accepted}]
        "pools": pool_report,  # disaggregated mode: the controller's decisions and the actors over time
        "decoder": decoder,  # lean | fallback (engine/support.py), and why; parity-checked at each engine's load
        "compression": tally.compression(cfg),
        "drafter_training": tally.drafter_training(trainer_report) if cfg.model.drafter_training.enabled else None,
        "shards_written": written,
        "shards_skipped": skipped,
        "shards_unreadable": bad,
        "rows_in_output": out.count_rows(),
        "config": dump(cfg),
        "config_hash": cfg.hash(),
        "versions": _versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.write_json("metrics.json", metrics)
    out.finish(complete=not bad)  # no _SUCCESS while a shard is missing
    return JobResult(output_path=out.url, rows=tally.rows, errors=tally.errors, output_tokens=tally.output_tokens,
                     wall_s=wall, shards_written=written, shards_skipped=skipped, metrics=metrics,
                     shards_unreadable=bad)


def start_drafter_trainer(cfg: JobConfig, run_id: str):
    """model.drafter_training: the trainer actor the generate actors send their rows to (else None)."""
    spec = cfg.drafter_training()
    if spec is None:
        return None
    from transformers import AutoConfig

    from actors.drafter_trainer import start_trainer
    from engine.model import image_token_id

    engine = cfg.engine()
    image = image_token_id(AutoConfig.from_pretrained(engine.target, trust_remote_code=engine.trust_remote_code))
    return start_trainer(spec, engine.drafter, image, engine.trust_remote_code, f"specray-drafter-trainer-{run_id}")


def finish_drafter_trainer(trainer) -> dict:
    """The trainer's final save and report; a trainer that died mid-job is on record, its last version saved."""
    try:
        return ray.get(trainer.finish.remote(), timeout=300)
    except Exception as e:  # noqa: BLE001 - the job's rows are all written; this is only the record
        why = " ".join(str(e).split())[:300]
        print(f"drafter trainer: no final report ({type(e).__name__}); its last published version stays where it "
              f"was saved", file=sys.stderr, flush=True)
        return {"events": [f"trainer lost before the end of the job: {type(e).__name__}: {why}"]}
    finally:
        ray.kill(trainer)


def _shard_runs(batch: pa.Table):
    """(shard, rows) for each run of one shard's rows in a batch, in order."""
    shards = batch.column("shard")
    n = batch.num_rows
    if n == 0:
        return
    change = pc.not_equal(shards.slice(1), shards.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = [0, *(np.flatnonzero(change) + 1).tolist(), n]
    for a, b in zip(starts[:-1], starts[1:]):
        yield shards[a].as_py(), batch.slice(a, b - a)


def _commit(out: OutputDir, shard: str, table: pa.Table, written: list[str], total: int, tally: _Tally) -> None:
    """Write a shard's part file, note when, and print the progress line."""
    out.commit(shard, table)
    written.append(shard)
    t = time.time() - tally.start
    tally.commits.append({"shard": shard, "t": round(t, 2), "rows": table.num_rows})
    print(f"[{t:7.1f}s] committed {shard}: {table.num_rows} rows | {len(written)}/{total} shards, "
          f"{tally.rows} rows, {tally.errors} errors, {tally.output_tokens / max(t, 1e-9):.1f} tokens/s",
          file=sys.stderr, flush=True)


def _stream(ds: ray.data.Dataset, out: OutputDir, cfg: JobConfig, pending: list[Shard], tally: _Tally) -> list[str]:
    carried = check_columns(cfg)
    written: list[str] = []
    current: str | None = None
    parts: list[pa.Table] = []

    def commit() -> None:
        _commit(out, current, output_table(current, parts, carried), written, len(pending), tally)

    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for shard, rows in _shard_runs(batch):
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


def _stream_any_order(ds: ray.data.Dataset, out: OutputDir, cfg: JobConfig, pending: list[Shard],
                      counts: dict[str, int], tally: _Tally) -> list[str]:
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
        for shard, rows in _shard_runs(batch):
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
