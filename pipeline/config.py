"""The job config: YAML validated by pydantic, unknown keys rejected, `--set a.b=c` overrides."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, model_validator

from engine.config import SELF_DRAFTERS, DrafterTraining, EngineConfig
from engine.request import SamplingParams
from pipeline.config_sections import (AutoscalerConfig, CompressionConfig, DecodingConfig, InputConfig, ModelConfig,
                                      OutputConfig, PreprocessConfig, ResourcesConfig, Section, TaskConfig)


class ConfigError(ValueError):
    """A bad config, reported as one line that names the field."""


class JobConfig(Section):
    input: InputConfig = InputConfig()
    task: TaskConfig = TaskConfig()
    model: ModelConfig
    decoding: DecodingConfig = DecodingConfig()
    output: OutputConfig = OutputConfig()
    resources: ResourcesConfig = ResourcesConfig()
    autoscaler: AutoscalerConfig = AutoscalerConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    compression: CompressionConfig = CompressionConfig()

    @model_validator(mode="after")
    def _backend(self) -> "JobConfig":
        c, drafter = self.compression, self.model.drafter
        self_draft = drafter is not None and drafter.startswith("self-")
        if self_draft and drafter not in SELF_DRAFTERS:
            raise ValueError(f"model.drafter: {drafter!r} is not a self-speculation drafter (self-int8 or self-int4)")
        if c.active() or c.evaluate or self_draft:
            field = "compression.weights" if c.weights != "none" else (
                "compression.visual_tokens" if c.visual_tokens.keep < 1 else
                "compression.evaluate" if c.evaluate else "model.drafter")
            if self.decoding.backend != "specray":
                raise ValueError(f"{field}: compression needs decoding.backend: specray")
            if self.decoding.decoder != "lean":
                raise ValueError(f"{field}: compression needs decoding.decoder: lean")
        if c.active() and c.apply_to != "target" and (drafter is None or drafter == "ngram" or self_draft):
            raise ValueError(f"compression.apply_to: {c.apply_to} needs a drafter model (model.drafter is {drafter})")
        if self.decoding.compile == "on" and (self.decoding.backend != "specray" or self.decoding.decoder != "lean"):
            raise ValueError("decoding.compile: on needs decoding.backend: specray and decoding.decoder: lean")
        if self.decoding.backend == "hf" and self.model.drafter is not None:
            raise ValueError("model.drafter: the hf backend is plain model.generate and does not speculate; "
                             "use decoding.backend: specray or drafter: null")
        if self.model.drafter_training.enabled:
            if self.decoding.backend != "specray":
                raise ValueError("model.drafter_training: needs decoding.backend: specray")
            if drafter is None or drafter == "ngram" or self_draft:
                raise ValueError(f"model.drafter_training: needs model.drafter to be a model (a folder or hub id), "
                                 f"not {drafter}")
            if self.resources.mode != "colocated":
                raise ValueError("model.drafter_training: needs resources.mode: colocated (drafter servers do not "
                                 "take new weights yet)")
        if self.resources.mode == "disaggregated":
            if self.decoding.backend != "specray":
                raise ValueError("resources.mode: disaggregated pools need decoding.backend: specray")
            if self.model.drafter is None:
                raise ValueError("model.drafter: resources.mode disaggregated needs a drafter (a path or ngram)")
            a = self.autoscaler
            if a.policy == "fixed" and a.targets + a.drafters * a.drafter_cost > a.devices + 1e-9:
                raise ValueError(f"autoscaler.targets: {a.targets} targets and {a.drafters} drafters need "
                                 f"{a.targets + a.drafters * a.drafter_cost:g} devices; autoscaler.devices is "
                                 f"{a.devices:g}")
        return self

    def check_job(self) -> None:
        """The fields a job needs beyond what pipeline.generate(ds, ...) needs."""
        if not self.input.paths:
            raise ConfigError("input.paths: required (a list of paths, globs or fsspec URLs)")
        if not self.output.path:
            raise ConfigError("output.path: required")

    def engine(self) -> EngineConfig:
        """The frozen config the actors and the engine get: model paths resolved (a local folder becomes an
        absolute path, so every actor finds it), the generate actors' resources."""
        d, r, learn = self.decoding, self.resources, self.model.drafter_training
        drafter = self.model.drafter
        if drafter is not None and drafter != "ngram" and drafter not in SELF_DRAFTERS:
            drafter = model_path(drafter)
        return EngineConfig(target=model_path(self.model.target), drafter=drafter, backend=d.backend, dtype=d.dtype,
                            decoder=d.decoder, max_batch_size=d.max_batch_size, kv_cache_gb=d.kv_cache_gb,
                            num_draft_tokens=d.num_draft_tokens,
                            trust_remote_code=self.model.trust_remote_code, compression=self.compression.to_engine(),
                            gpus=r.gpus_per_actor, threads=max(1, round(r.cpus_per_actor)),
                            parity_check=d.parity_check, compile=d.compile, drafter_learns=learn.enabled,
                            capture_topk=learn.top_k if learn.enabled and learn.learn_from == "topk" else 0)

    def drafter_training(self) -> DrafterTraining | None:
        """What the drafter trainer gets (None when the drafter does not learn)."""
        t = self.model.drafter_training
        if not t.enabled:
            return None
        save_to = t.save_to or self.output.path.rstrip("/") + "/drafter"
        return DrafterTraining(learning_rate=t.learning_rate, batch_size=t.batch_size, publish_every=t.publish_every,
                               buffer_rows=t.buffer_rows, passes=t.passes, learn_from=t.learn_from, top_k=t.top_k,
                               save_to=save_to, cpus=t.cpus, gpus=t.gpus, seed=self.decoding.seed)

    def sampling(self) -> SamplingParams:
        d = self.decoding
        return SamplingParams(max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_p=d.top_p,
                              top_k=d.top_k, seed=d.seed, stop=list(d.stop))

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def model_path(path: str) -> str:
    """A local model folder as an absolute path (actors run elsewhere); anything else (a hub id) as it is."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected dotted.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if ":" in msg and msg.split(":", 1)[0].count(".") >= 1 and " " not in msg.split(":", 1)[0]:
        return msg  # the validator already named the field
    return f"{loc}: {msg}" if loc else msg


def load_config(source: str | Path | dict | JobConfig, overrides: list[str] | None = None) -> JobConfig:
    """A validated JobConfig from a YAML path, a dict or a JobConfig; raises ConfigError (one line)."""
    if isinstance(source, JobConfig) and not overrides:
        return source
    if isinstance(source, JobConfig):
        raw = source.model_dump()
    elif isinstance(source, dict):
        raw = json.loads(json.dumps(source))
    else:
        path = Path(source)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def dump(config: JobConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")
