"""The preprocess and generate stages, as Ray Data operators; and `generate(ds, config)`, the Dataset API.

    rows (shard, key, image | image_path, fields)
      -> preprocess (CPU tasks: decode, validate, prompt, processor)  [pipeline.preprocess]
      -> generate   colocated: an actor pool, one engine (and drafter) per actor   [actors.generator]
                    disaggregated: routers handing batches to the target pool,
                    whose groups draft on the drafter pool (both sized by the controller)  [actors.pools]
      -> rows (shard, key, fields, text, finish_reason, token counts, error)
"""
from __future__ import annotations

import functools
import json
import uuid
from dataclasses import replace
from typing import Callable

import ray
from ray.data import ActorPoolStrategy
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.generate_actor import GenerateActor
from actors.pool_manager import PoolManager, PoolSpec
from pipeline.config import JobConfig, load_config
from pipeline.preprocess import preprocess_row
from pipeline.read import table_row


def _normalise_and_preprocess(row: dict, normalise: Callable[[dict], dict], **kwargs) -> dict:
    # one fused task: normalise never fails on bad input (it only moves values), preprocess turns
    # every failure into the row's error
    return preprocess_row(normalise(row), **kwargs)


def _evaluate(cfg: JobConfig) -> float | None:
    return cfg.compression.evaluate_fraction if cfg.compression.evaluate else None


def start_pools(cfg: JobConfig):
    """The pool manager of a disaggregated job (it starts the target and drafter actors); kill it when done."""
    a, r = cfg.autoscaler, cfg.resources
    engine = cfg.engine()
    spec = PoolSpec(
        target_kwargs={"engine": engine, "params": cfg.sampling(), "evaluate": _evaluate(cfg)},
        target_options={"num_cpus": r.cpus_per_actor, "num_gpus": r.gpus_per_actor,
                        "resources": dict(a.target_resources)},
        drafter_kwargs={"config": replace(engine, gpus=a.drafter_gpus, threads=max(1, round(a.drafter_cpus)))},
        drafter_options={"num_cpus": a.drafter_cpus, "num_gpus": a.drafter_gpus,
                         "resources": dict(a.drafter_resources)},
        budget={"devices": a.devices, "drafter_cost": a.drafter_cost, "max_drafters": a.max_drafters,
                "max_k": a.max_k},
        policy=a.policy, fixed={"targets": a.targets, "drafters": a.drafters, "k": a.k}, groups=a.groups,
        group_rows=-(-cfg.decoding.max_batch_size // a.groups), interval_s=a.interval_s,
        drain_timeout_s=a.drain_timeout_s)
    name = f"specray-pools-{uuid.uuid4().hex[:8]}"
    ctx = ray.get_runtime_context()
    here = NodeAffinitySchedulingStrategy(ctx.get_node_id(), soft=False)  # the driver's node: it lives as long
    return ray.remote(PoolManager).options(name=name, num_cpus=0, max_concurrency=64, scheduling_strategy=here
                                           ).remote(spec, name, ctx.namespace)


class Router:
    """The generate stage of a disaggregated job: each batch goes to a target actor the pool manager picks.
    A target lost mid-batch (killed, node removed) is reported and the batch is redone on another one, so every
    row comes out exactly once."""

    def __init__(self, manager, attempts: int = 8):
        self.manager, self.attempts = manager, attempts

    def __call__(self, batch):
        for _ in range(self.attempts):
            target_id, target = ray.get(self.manager.acquire.remote())
            try:
                out = ray.get(target.generate_batch.remote(batch))
            except ray.exceptions.RayActorError as e:
                ray.get(self.manager.release.remote(target_id, failed=str(e).splitlines()[0][:200] or "lost"))
                continue
            self.manager.release.remote(target_id)
            return out
        raise RuntimeError(f"no target actor completed the batch in {self.attempts} attempts")


def generate_stages(ds: ray.data.Dataset, cfg: JobConfig, normalise: Callable[[dict], dict],
                    pools=None) -> ray.data.Dataset:
    """Source rows in (`normalise` maps them to pipeline.read's row shape), output rows out. A disaggregated
    config needs `pools` (start_pools)."""
    model = cfg.engine().target
    r = cfg.resources
    ds = ds.map(_normalise_and_preprocess, num_cpus=r.preprocess_cpus, fn_kwargs={
        "normalise": normalise, "model_path": model, "prompt_template": cfg.task.prompt,
        "max_pixels": cfg.preprocess.max_image_pixels, "trust_remote_code": cfg.model.trust_remote_code})
    if r.mode == "disaggregated":
        routers = max(2, 2 * int(cfg.autoscaler.devices))  # two batches per target: the next one is waiting
        return ds.map_batches(Router, fn_constructor_kwargs={"manager": pools},
                              compute=ActorPoolStrategy(size=routers), batch_size=r.batch_size,
                              batch_format="pyarrow", num_cpus=0.01)
    return ds.map_batches(
        GenerateActor,
        fn_constructor_kwargs={"engine": cfg.engine(), "params": cfg.sampling(), "evaluate": _evaluate(cfg)},
        compute=ActorPoolStrategy(size=r.num_actors),
        batch_size=r.batch_size,
        batch_format="pyarrow",
        num_cpus=r.cpus_per_actor,
        num_gpus=r.gpus_per_actor,
    )


def _to_user(row: dict) -> dict:
    out = json.loads(row.pop("fields"))
    row.pop("shard"), row.pop("generate_s")
    if row["key"] is None:
        row.pop("key")
    out.update(row)
    return out


def generate(ds: ray.data.Dataset, config) -> ray.data.Dataset:
    """A Dataset of image rows in; the same rows plus text, finish_reason, token counts and error out.

    `config` is a JobConfig, a dict or a YAML path; only its task, model, decoding and resources sections
    are used (input.image_column / image_path_column / id_column name the row's columns).
    """
    cfg = load_config(config)
    pools = start_pools(cfg) if cfg.resources.mode == "disaggregated" else None  # lives as long as the driver
    return generate_stages(ds, cfg, functools.partial(table_row, cfg=cfg.input, shard=""), pools).map(_to_user)
