"""The preprocess and generate stages, as Ray Data operators; and `generate(ds, config)`, the Dataset API.

    source rows (shard, key, image | image_path, fields)  [pipeline.read]
      -> preprocess (CPU tasks: decode, validate, prompt, processor)  [pipeline.preprocess]
      -> generate   colocated: an actor pool, one engine (and drafter) per actor   [actors.generate_actor]
                    disaggregated: routers handing batches to the target pool,  [actors.router]
                    whose groups draft on the drafter pool (both sized by the controller)  [actors.pool_manager]
      -> result rows (shard, key, text, finish_reason, token counts, error, carried)
    Each step's rows and their Arrow types: actors/row_schemas.py.
"""
from __future__ import annotations

import functools
import uuid
from dataclasses import replace
from typing import Callable

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
from ray.data.block import BlockAccessor
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.controller import Budget, Plan
from actors.generate_actor import GenerateActor
from actors.pool_manager import PoolManager, PoolSpec
from actors.router import Router
from actors.worker_deaths import WorkerDeaths
from pipeline.config import JobConfig, load_config
from pipeline.preprocess import preprocess_row
from pipeline.read import table_row
from actors.row_schemas import CARRIED, RESULT
from pipeline.rows import (carried_columns, check_columns, check_input_columns, check_source_row,
                           preprocessed_table)


def _preprocess_batch(block, normalise: Callable[[dict], dict], carry: list[str] | None, **kwargs) -> pa.Table:
    """The preprocess stage on a block of input rows (as Ray Data hands a row-wise map its rows): normalise each
    (it never fails on bad input, it only moves values) and preprocess it (every failure becomes the row's
    error), then one Arrow table of PREPROCESSED's types: a row that drifts from the contract fails loudly."""
    rows = BlockAccessor.for_block(block).iter_rows(public_row_format=True)
    return preprocessed_table([preprocess_row(check_source_row(normalise(row)), carry=carry, **kwargs)
                               for row in rows])


def _worker_deaths():
    """The job's notes of rows that killed a generate actor's process (actors/worker_deaths.py): an actor of its
    own, which outlives the generate actors, alive as long as the stage refers to it."""
    return ray.remote(WorkerDeaths).options(num_cpus=0).remote()


def _evaluate(cfg: JobConfig) -> float | None:
    return cfg.compression.evaluate_fraction if cfg.compression.evaluate else None


def start_pools(cfg: JobConfig):
    """The pool manager of a disaggregated job (it starts the target and drafter actors); kill it when done."""
    a, r = cfg.autoscaler, cfg.resources
    engine = cfg.engine()
    spec = PoolSpec(
        engine=engine, params=cfg.sampling(), evaluate=_evaluate(cfg),
        drafter_engine=replace(engine, gpus=a.drafter_gpus, threads=max(1, round(a.drafter_cpus))),
        target_options={"num_cpus": r.cpus_per_actor, "num_gpus": r.gpus_per_actor,
                        "resources": dict(a.target_resources)},
        drafter_options={"num_cpus": a.drafter_cpus, "num_gpus": a.drafter_gpus,
                         "resources": dict(a.drafter_resources)},
        budget=Budget(devices=a.devices, drafter_cost=a.drafter_cost, max_drafters=a.max_drafters, max_k=a.max_k),
        policy=a.policy, fixed=Plan("disaggregated", a.targets, a.drafters if a.k else 0, a.k), groups=a.groups,
        group_rows=-(-cfg.decoding.max_batch_size // a.groups), interval_s=a.interval_s,
        drain_timeout_s=a.drain_timeout_s)
    name = f"specray-pools-{uuid.uuid4().hex[:8]}"
    ctx = ray.get_runtime_context()
    here = NodeAffinitySchedulingStrategy(ctx.get_node_id(), soft=False)  # the driver's node: it lives as long
    return ray.remote(PoolManager).options(name=name, num_cpus=0, max_concurrency=64, scheduling_strategy=here
                                           ).remote(spec, name, ctx.namespace)


def generate_stages(ds: ray.data.Dataset, cfg: JobConfig, normalise: Callable[[dict], dict],
                    pools=None, all_columns: bool = False, run_id: str | None = None,
                    trainer=None) -> ray.data.Dataset:
    """Source rows in (`normalise` maps them to pipeline.read's row shape), result rows out, carrying the
    job's output.columns (all_columns: every input column, as pipeline.generate does). A disaggregated
    config needs `pools` (start_pools). `run_id`: the actors record their start-up under it (actors/startup.py).
    `trainer`: model.drafter_training's trainer actor (actors/drafter_trainer.py)."""
    model = cfg.engine().target
    r = cfg.resources
    # Each preprocess task runs in a worker process whose first task loads the processor (torch and transformers:
    # ~4.5 s of CPU). CPU-only actors get one preprocess task each by default: more only slow the start (on two
    # cores, four such processes starting together cost the first row 14 s) and the actors cannot use the rows
    # faster; GPU actors get as many as the free CPUs allow (resources.preprocess_tasks sets it).
    tasks = r.preprocess_tasks or (r.num_actors if r.gpus_per_actor == 0 and r.mode == "colocated" else None)
    # Blocks of one batch each, cut in the preprocess task itself (Ray fuses map_batches -> this repartition
    # into one operator): a generate task then takes one batch, and its rows reach the driver when that batch
    # is done, not when the rest of its shard is (Ray Data releases a task's output when it ends).
    # batch_format None: the block as read (pandas for WebDataset), its rows as a row-wise map would see them.
    ds = ds.map_batches(_preprocess_batch, batch_size=r.batch_size, batch_format=None, num_cpus=r.preprocess_cpus,
                        concurrency=tasks, fn_kwargs={
                            "normalise": normalise, "model_path": model, "prompt_template": cfg.task.prompt,
                            "max_pixels": cfg.preprocess.max_image_pixels,
                            "trust_remote_code": cfg.model.trust_remote_code,
                            "carry": None if all_columns else check_columns(cfg)}
                        ).repartition(target_num_rows_per_block=r.batch_size)
    if r.mode == "disaggregated":
        routers = max(2, 2 * int(cfg.autoscaler.devices))  # two batches per target: the next one is waiting
        return ds.map_batches(Router, fn_constructor_kwargs={"manager": pools},
                              compute=ActorPoolStrategy(size=routers), batch_size=r.batch_size,
                              batch_format="pyarrow", num_cpus=0.01)
    deaths = _worker_deaths()
    return ds.map_batches(
        GenerateActor,
        fn_constructor_kwargs={"engine": cfg.engine(), "params": cfg.sampling(), "evaluate": _evaluate(cfg),
                               "run_id": run_id, "trainer": trainer, "memory_limit": r.memory_per_actor,
                               "deaths": deaths, "death_retries": r.worker_death_retries},
        compute=ActorPoolStrategy(size=r.num_actors),
        batch_size=r.batch_size,
        batch_format="pyarrow",
        num_cpus=r.cpus_per_actor,
        num_gpus=r.gpus_per_actor,
    )


def _own_columns(keyed: bool) -> list[str]:
    """pipeline.generate's own output columns: the result's, less shard, generate_s, drafter_version and the
    carried values (they become columns of their own); key only where input.id_column names one."""
    return [name for name in RESULT.names if name not in ("shard", "generate_s", "drafter_version", CARRIED)
            and (keyed or name != "key")]


def _to_user(batch: pa.Table, id_column: str | None) -> pa.Table:
    """Result rows as pipeline.generate's rows: the input columns (less the image; the id column where it is
    named like an output column is the key itself), then the result's own. generate refused any other input
    column named like one of those; one that comes anyway (a schema Ray could not tell up front) fails loudly."""
    own = _own_columns(id_column is not None)
    columns = {k: v for k, v in carried_columns([batch]).items() if not (k == id_column and k in own)}
    check_input_columns(list(columns), own, id_column)
    columns.update((name, batch.column(name)) for name in own)
    return pa.table(list(columns.values()), names=list(columns))


def generate(ds: ray.data.Dataset, config) -> ray.data.Dataset:
    """A Dataset of image rows in; the same rows plus text, finish_reason, token counts and error out.

    `config` is a JobConfig, a dict or a YAML path; only its task, model, decoding and resources sections
    are used (input.image_column / image_path_column / id_column name the row's columns).
    """
    cfg = load_config(config)
    # every input column is carried: one named like an output column is refused, as the CLI refuses it
    check_input_columns(ds.columns() or [], _own_columns(cfg.input.id_column is not None), cfg.input.id_column)
    pools = start_pools(cfg) if cfg.resources.mode == "disaggregated" else None  # lives as long as the driver
    normalise = functools.partial(table_row, cfg=cfg.input, shard="")
    return generate_stages(ds, cfg, normalise, pools, all_columns=True).map_batches(
        _to_user, batch_format="pyarrow", fn_kwargs={"id_column": cfg.input.id_column})
