"""Running a job, its outline: check the config, lock the output, list and inspect the shards, start Ray (and
the pools and drafter trainer where asked), stream the generate stage's results into committed part files
(pipeline/commit.py), then metrics.json (pipeline/metrics.py) and _SUCCESS.

The driver takes the output batches in whatever order they finish where each shard's rows can be counted by
key (WebDataset), else in input order. A killed job loses only the shards it had not committed; the rerun
skips every committed shard.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import ray

from actors.startup import collect, phases
from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.commit import stream_any_order, stream_in_order
from pipeline.metrics import Tally, job_metrics
from pipeline.preprocess import prompt_columns
from pipeline.read import read_shards
from pipeline.shards import inspect_shard, list_shards, resolve_format
from pipeline.rows import check_columns
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
    tally, written, pool_report, trainer_report = Tally(), [], None, None
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
        # every stage builds its Arrow blocks to the row contract (actors/row_schemas.py): a value that fits no
        # Arrow type fails loudly, never travels pickled
        ctx.enable_fallback_to_arrow_object_ext_type = False
        needed = prompt_columns(cfg.task.prompt) | set(check_columns(cfg))
        ds, normalise = read_shards(cfg.input, pending, needed)
        pools = start_pools(cfg) if cfg.resources.mode == "disaggregated" else None
        trainer = start_drafter_trainer(cfg, run_id)
        try:
            results = generate_stages(ds, cfg, normalise, pools, run_id=run_id, trainer=trainer)
            written = (stream_any_order(results, out, cfg, pending, counts, tally) if any_order
                       else stream_in_order(results, out, cfg, pending, tally))
        finally:
            if pools is not None:
                pool_report = ray.get(pools.shutdown.remote())
                ray.kill(pools)
            if trainer is not None:
                trainer_report = finish_drafter_trainer(trainer)
    wall = time.time() - start
    tally.sample(final=True)
    startup = phases(start, ray_called, ray_ready, tally.first_row, collect(run_id) if ray_ready is not None else [])
    metrics = job_metrics(cfg, tally, wall=wall, startup=startup, any_order=any_order, pool_report=pool_report,
                          decoder=decoder, trainer_report=trainer_report, written=written, skipped=skipped, bad=bad,
                          rows_in_output=out.count_rows())
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
