"""The preprocess and generate stages, as Ray Data operators; and `generate(ds, config)`, the Dataset API.

    rows (shard, key, image | image_path, fields)
      -> preprocess (CPU tasks: decode, validate, prompt, processor)  [pipeline.preprocess]
      -> generate   (an actor pool, one engine per actor)              [actors.generator]
      -> rows (shard, key, fields, text, finish_reason, token counts, error)
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import ray
from ray.data import ActorPoolStrategy

from actors.generator import Generator
from actors.request import SamplingParams
from pipeline.config import JobConfig, load_config
from pipeline.preprocess import preprocess_row
from pipeline.read import table_row


def _model_path(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path  # a local dir, or a hub id


def sampling_params(cfg: JobConfig) -> SamplingParams:
    d = cfg.decoding
    return SamplingParams(max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_p=d.top_p,
                          top_k=d.top_k, seed=d.seed, stop=list(d.stop))


def engine_kwargs(cfg: JobConfig) -> dict:
    d = cfg.decoding
    drafter = cfg.model.drafter
    if drafter is not None and drafter != "ngram":
        drafter = _model_path(drafter)
    return {"backend": d.backend, "drafter": drafter, "dtype": d.dtype, "max_batch_size": d.max_batch_size,
            "num_draft_tokens": d.num_draft_tokens, "decoder": d.decoder,
            "trust_remote_code": cfg.model.trust_remote_code}


def _normalise_and_preprocess(row: dict, normalise: Callable[[dict], dict], **kwargs) -> dict:
    # one fused task: normalise never fails on bad input (it only moves values), preprocess turns
    # every failure into the row's error
    return preprocess_row(normalise(row), **kwargs)


def generate_stages(ds: ray.data.Dataset, cfg: JobConfig, normalise: Callable[[dict], dict]) -> ray.data.Dataset:
    """Source rows in (`normalise` maps them to pipeline.read's row shape), output rows out."""
    model = _model_path(cfg.model.target)
    r = cfg.resources
    ds = ds.map(_normalise_and_preprocess, num_cpus=r.preprocess_cpus, fn_kwargs={
        "normalise": normalise, "model_path": model, "prompt_template": cfg.task.prompt,
        "max_pixels": cfg.preprocess.max_image_pixels, "trust_remote_code": cfg.model.trust_remote_code})
    return ds.map_batches(
        Generator,
        fn_constructor_kwargs={
            "model_path": model, "params": vars(sampling_params(cfg)), "engine": engine_kwargs(cfg),
            "threads": max(1, round(r.cpus_per_actor)), "gpus": r.gpus_per_actor},
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
    return generate_stages(ds, cfg, functools.partial(table_row, cfg=cfg.input, shard="")).map(_to_user)
