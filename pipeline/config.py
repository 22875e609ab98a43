"""The job config: YAML validated by pydantic, unknown keys rejected, `--set a.b=c` overrides."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.config import SELF_DRAFTERS, TOWER_RANKINGS, Compression, DrafterTraining, EngineConfig
from engine.request import SamplingParams

ENGINE = EngineConfig(target="")  # the engine's defaults, stated once in engine/config.py
COMPRESSION = Compression()
DRAFTER_TRAINING = DrafterTraining()

DEFAULT_PROMPTS = {
    "caption": "Describe the image.",
    "ocr": "What does the text say?",
    "vqa": "{question}",
}


class ConfigError(ValueError):
    """A bad config, reported as one line that names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputConfig(Section):
    paths: list[str] = []  # required to run a job; pipeline.generate(ds, ...) needs none
    format: Literal["auto", "webdataset", "parquet", "hf"] = "auto"
    image_column: str | None = None  # default: jpg/jpeg/png/webp member (webdataset) or `image` (parquet, hf)
    image_path_column: str | None = None  # a column of image paths or fsspec URLs instead of bytes
    id_column: str | None = None  # default key: WebDataset __key__, else "<shard>:<row index>"
    hf_split: str = "train"
    # a shard that cannot be read (truncated, corrupt): skip it, report it and finish the others (exit code 4),
    # or fail the job before any work (exit code 1)
    on_unreadable: Literal["skip", "fail"] = "skip"


class TaskConfig(Section):
    kind: Literal["caption", "ocr", "vqa", "custom"] = "caption"
    prompt: str | None = None  # template; {column} takes the row's value

    @model_validator(mode="after")
    def _prompt(self) -> "TaskConfig":
        if self.prompt is None:
            if self.kind == "custom":
                raise ValueError("task.prompt: required when task.kind is custom")
            self.prompt = DEFAULT_PROMPTS[self.kind]
        return self


class DrafterTrainingConfig(Section):
    """The drafter learns during the job from the target's own outputs (engine/drafter_learning.py): a trainer
    actor takes optimizer steps and publishes new weights; the generate actors swap them in between batches."""
    enabled: bool = False
    learning_rate: float = Field(DRAFTER_TRAINING.learning_rate, gt=0)
    batch_size: int = Field(DRAFTER_TRAINING.batch_size, ge=1)  # rows per optimizer step
    publish_every: int = Field(DRAFTER_TRAINING.publish_every, ge=1)  # optimizer steps between published versions
    buffer_rows: int = Field(DRAFTER_TRAINING.buffer_rows, ge=1)  # the latest finished rows the trainer draws from
    # each finished row is trained on about this many times; then the trainer waits for new rows (and frees its
    # CPU or GPU for the job) instead of fitting the same rows again
    passes: float = Field(DRAFTER_TRAINING.passes, gt=0)
    learn_from: Literal["tokens", "topk"] = DRAFTER_TRAINING.learn_from  # topk: the target's top-k logits too
    top_k: int = Field(DRAFTER_TRAINING.top_k, ge=1, le=1024)
    save_to: str | None = None  # where the learned drafter is saved (default: <output.path>/drafter)
    cpus: float = Field(DRAFTER_TRAINING.cpus, gt=0)  # the trainer actor's CPUs (its torch threads)
    gpus: float = Field(0.0, ge=0)  # > 0 with CUDA: the trainer trains on a GPU


class ModelConfig(Section):
    target: str
    drafter: str | None = None  # speculation: a small model (VLM or text-only; path or hub id), `ngram`, or null
    trust_remote_code: bool = False
    drafter_training: DrafterTrainingConfig = DrafterTrainingConfig()  # off by default


class DecodingConfig(Section):
    backend: Literal["specray", "hf"] = "specray"  # hf: plain model.generate, the reference
    num_draft_tokens: int | Literal["auto"] = ENGINE.num_draft_tokens
    max_batch_size: int = Field(ENGINE.max_batch_size, ge=1)  # the engine's slots: sequences decoded together
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
    decoder: Literal["lean", "hf"] = ENGINE.decoder  # hf: the generic HF forward (any architecture; slower)
    parity_check: bool = ENGINE.parity_check  # at load: refuse a model the decoder would run wrong (engine/parity.py)
    max_new_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int = 0
    stop: list[str] = []

    @model_validator(mode="after")
    def _check(self) -> "DecodingConfig":
        if isinstance(self.num_draft_tokens, int) and not 1 <= self.num_draft_tokens <= 32:
            raise ValueError("decoding.num_draft_tokens: must be between 1 and 32, or auto")
        return self


class OutputConfig(Section):
    path: str = ""  # required to run a job
    columns: list[str] = []  # input columns copied to the output rows
    overwrite: bool = False
    lock_stale_s: float = Field(120.0, gt=0)  # a lock whose heartbeat is older than this is taken over
    # any: a shard is committed as soon as all its rows are out, whatever order batches finish in (WebDataset
    # shards keyed by their samples; other inputs keep input order); input: rows come in input order
    commit_order: Literal["any", "input"] = "any"


class ResourcesConfig(Section):
    mode: Literal["colocated", "disaggregated"] = "colocated"  # disaggregated: drafter and target pools (autoscaler.*)
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    preprocess_cpus: float = Field(0.5, gt=0)
    # preprocess tasks at once (read + decode + processor). Each runs in a worker process whose first task loads
    # the processor (imports torch and transformers: seconds of CPU). null: one per actor with CPU-only colocated
    # actors, else as many as the free CPUs allow (pipeline/stages.py)
    preprocess_tasks: int | None = Field(None, ge=1)


class AutoscalerConfig(Section):
    """The pools of `resources.mode: disaggregated`: targets (resources.cpus/gpus_per_actor each) and drafters."""
    devices: float = Field(2.0, gt=0)  # the budget, in device units: a target takes 1, a drafter drafter_cost
    drafter_cost: float = Field(0.5, ge=0)  # 0: drafters take no device (CPU-only drafters)
    policy: Literal["auto", "fixed"] = "auto"  # auto: the controller decides; fixed: targets/drafters/k below
    targets: int = Field(1, ge=1)  # fixed policy
    drafters: int = Field(1, ge=0)  # fixed policy
    k: int = Field(4, ge=0, le=32)  # fixed policy (0: no speculation)
    max_drafters: int = Field(8, ge=0)
    max_k: int = Field(8, ge=1, le=32)
    groups: int = Field(2, ge=1, le=8)  # groups of sequences in flight per target (draft one, verify another)
    interval_s: float = Field(5.0, gt=0)  # how often the controller re-plans
    drafter_cpus: float = Field(1.0, gt=0)  # also the drafter's torch threads
    drafter_gpus: float = Field(0.0, ge=0)
    drafter_resources: dict[str, float] = {}  # custom node resources, e.g. {drafter_node: 1}
    target_resources: dict[str, float] = {}
    drain_timeout_s: float = Field(60.0, gt=0)  # a draining drafter is removed at the latest after this


class VisualTokensConfig(Section):
    keep: float = Field(COMPRESSION.visual_keep, gt=0, le=1)  # fraction of each image's tokens the decoder sees
    # [CLS] attention (FasterVLM) | ToDRE's diversity | spread: diversity that also covers the image (tower only)
    method: Literal["attention", "diversity", "spread"] = COMPRESSION.visual_method
    merge: bool = COMPRESSION.visual_merge  # fold each pruned token into its nearest kept token, not drop it
    # prune inside a patch-merging vision tower (Qwen2-VL, Qwen2.5-VL) before this block, so the tower's later
    # blocks run on the kept tokens only (diversity or spread; a model trained with it); null: after the tower
    tower_layer: int | None = Field(COMPRESSION.visual_tower_layer, ge=0)


class CompressionConfig(Section):
    weights: Literal["none", "int8", "int4"] = COMPRESSION.weights  # weight-only quantization of decoder linears
    group_size: int = Field(COMPRESSION.group_size, ge=8, le=1024)  # int4: input channels per scale and zero
    apply_to: Literal["target", "drafter", "both"] = COMPRESSION.apply_to  # which model's weights, visual tokens
    visual_tokens: VisualTokensConfig = VisualTokensConfig()
    evaluate: bool = False  # measure agreement with the uncompressed target on a sample of the job's rows
    evaluate_fraction: float = Field(0.05, gt=0, le=1)  # the sample: rows whose key hashes into this fraction

    @model_validator(mode="after")
    def _check(self) -> "CompressionConfig":
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"compression.group_size: must be a power of two, not {self.group_size}")
        v = self.visual_tokens
        if v.tower_layer is not None and v.method not in TOWER_RANKINGS:
            raise ValueError("compression.visual_tokens.method: pruning inside the tower (tower_layer) ranks by "
                             f"diversity or spread, not {v.method}")
        if v.tower_layer is None and v.method == "spread":
            raise ValueError("compression.visual_tokens.method: spread ranks tokens inside the vision tower; set "
                             "tower_layer, or use diversity")
        if v.tower_layer is not None and v.merge:
            raise ValueError("compression.visual_tokens.merge: the tower never encodes the tokens it prunes "
                             "inside it (tower_layer), so there is nothing to merge")
        return self

    def active(self) -> bool:
        return self.weights != "none" or self.visual_tokens.keep < 1

    def to_engine(self) -> Compression:
        v = self.visual_tokens
        return Compression(weights=self.weights, group_size=self.group_size, visual_keep=v.keep,
                           visual_method=v.method, visual_merge=v.merge, visual_tower_layer=v.tower_layer,
                           apply_to=self.apply_to)


class PreprocessConfig(Section):
    max_image_pixels: int = Field(40_000_000, ge=1)  # larger images are refused (decompression bombs)


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
                            decoder=d.decoder, max_batch_size=d.max_batch_size, num_draft_tokens=d.num_draft_tokens,
                            trust_remote_code=self.model.trust_remote_code, compression=self.compression.to_engine(),
                            gpus=r.gpus_per_actor, threads=max(1, round(r.cpus_per_actor)),
                            parity_check=d.parity_check, drafter_learns=learn.enabled,
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
