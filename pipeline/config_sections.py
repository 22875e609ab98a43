"""The job config's sections, one class per top-level key of the YAML (input, task, model, decoding, output,
resources, autoscaler, compression, preprocess): their fields, defaults and bounds, each checked on its own.
pipeline/config.py's JobConfig puts them together and checks what spans sections."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.config import (TOWER_RANKINGS, ApplyTo, Backend, Compile, Compression, Decoder, DrafterTraining, Dtype,
                           EngineConfig, LearnFrom, VisualMethod, Weights)

ENGINE = EngineConfig(target="")  # the engine's defaults, stated once in engine/config.py
COMPRESSION = Compression()
DRAFTER_TRAINING = DrafterTraining()

DEFAULT_PROMPTS = {
    "caption": "Describe the image.",
    "ocr": "What does the text say?",
    "vqa": "{question}",
}


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
    learn_from: LearnFrom = DRAFTER_TRAINING.learn_from  # topk: the target's top-k logits too
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
    backend: Backend = "specray"  # hf: plain model.generate, the reference
    num_draft_tokens: int | Literal["auto"] = ENGINE.num_draft_tokens
    max_batch_size: int = Field(ENGINE.max_batch_size, ge=1)  # the engine's slots: sequences decoded together
    kv_cache_gb: float = Field(ENGINE.kv_cache_gb, ge=0.0)  # > 0: the KV cache sized once (0: CUDA 85% free; CPU by need)
    dtype: Dtype = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
    decoder: Decoder = ENGINE.decoder  # hf: the generic HF forward (any architecture; slower)
    parity_check: bool = ENGINE.parity_check  # at load: refuse a model the decoder would run wrong (engine/parity.py)
    compile: Compile = ENGINE.compile  # on: decode/verify steps compiled per shape bucket (auto: on CUDA only)
    max_new_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int = 0
    stop: list[str] = []

    @field_validator("compile", mode="before")
    @classmethod
    def _on_off(cls, value):  # YAML reads a bare on / off as a boolean
        return ("on" if value else "off") if isinstance(value, bool) else value

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
    # bytes of resident memory a generate actor may use (colocated mode); past it the process is killed, as a
    # container's limit kills it (actors/memory_limit.py). null: no limit of specray's own
    memory_per_actor: int | None = Field(None, ge=1)
    # a batch whose actor process died is re-run whole this many times, then split to find the row that kills
    # it, which becomes an error row (actors/worker_deaths.py)
    worker_death_retries: int = Field(1, ge=0)


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
    method: VisualMethod = COMPRESSION.visual_method
    merge: bool = COMPRESSION.visual_merge  # fold each pruned token into its nearest kept token, not drop it
    # prune inside a patch-merging vision tower (Qwen2-VL, Qwen2.5-VL) before this block, so the tower's later
    # blocks run on the kept tokens only (diversity or spread; a model trained with it); null: after the tower
    tower_layer: int | None = Field(COMPRESSION.visual_tower_layer, ge=0)


class CompressionConfig(Section):
    weights: Weights = COMPRESSION.weights  # weight-only quantization of decoder linears
    group_size: int = Field(COMPRESSION.group_size, ge=8, le=1024)  # int4: input channels per scale and zero
    apply_to: ApplyTo = COMPRESSION.apply_to  # which model's weights, visual tokens
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
