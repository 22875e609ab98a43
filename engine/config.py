"""What the engine loads and how: frozen, typed, built once from the job's validated config (pipeline/config.py)
and handed down unchanged to the actors and the engine. Nothing here imports torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SELF_DRAFTERS = {"self-int8": "int8", "self-int4": "int4"}  # model.drafter: the target, quantized, drafts for itself
WEIGHT_BITS = {"none": None, "int8": 8, "int4": 4}
TOWER_RANKINGS = ("diversity", "spread")  # the visual_method values that can rank inside the tower (tower_layer)

# the enumerated fields' values, stated once (pipeline/config_sections.py validates the job's config against them)
Weights = Literal["none", "int8", "int4"]  # weight-only quantization of the decoder's linears
VisualMethod = Literal["attention", "diversity", "spread"]  # how image tokens are ranked for pruning
ApplyTo = Literal["target", "drafter", "both"]  # which model's weights and visual tokens are compressed
LearnFrom = Literal["tokens", "topk"]  # what a learning drafter distils: tokens, or the target's top-k logits too
Backend = Literal["specray", "hf"]  # hf: plain model.generate, the reference
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Decoder = Literal["lean", "hf"]  # hf: the generic HF forward
Compile = Literal["off", "on", "auto"]  # the decode and verify steps compiled (engine/captured_step.py); auto: on CUDA


@dataclass(frozen=True)
class Compression:
    """The compression of one model, or (with apply_to) of a job: the single statement of the defaults."""
    weights: Weights = "none"
    group_size: int = 64  # int4: input channels per scale and zero
    visual_keep: float = 1.0  # fraction of image tokens the decoder sees
    visual_method: VisualMethod = "attention"  # spread: inside the tower only
    visual_merge: bool = False  # fold pruned tokens into their nearest kept token
    visual_tower_layer: int | None = None  # prune inside a patch-merging tower, before this block (None: after it)
    apply_to: ApplyTo = "target"  # a job's section; a resolved model's is moot

    @property
    def bits(self) -> int | None:
        return WEIGHT_BITS[self.weights]

    def for_models(self, drafter: str | None) -> tuple["Compression", "Compression"]:
        """(target's, drafter's) compression. A self-speculation drafter is the target's weights at its own
        precision, over the target's pruned prompt."""
        none = Compression(group_size=self.group_size)
        target = self if self.apply_to in ("target", "both") else none
        if drafter in SELF_DRAFTERS:
            return target, Compression(SELF_DRAFTERS[drafter], self.group_size, target.visual_keep,
                                       target.visual_method, target.visual_merge, target.visual_tower_layer)
        return target, self if self.apply_to in ("drafter", "both") else none


@dataclass(frozen=True)
class DrafterTraining:
    """How a drafter learns during the job (model.drafter_training; engine/drafter_learning.py): the defaults."""
    learning_rate: float = 3e-4
    batch_size: int = 16  # rows per optimizer step
    publish_every: int = 10  # optimizer steps between published versions
    buffer_rows: int = 4096  # the latest finished rows steps are drawn from
    passes: float = 2.0  # steps stop at passes x rows seen / batch_size: the trainer idles until new rows come
    learn_from: LearnFrom = "tokens"
    top_k: int = 8
    save_to: str = ""  # where the learned drafter is saved at the end of the job
    cpus: float = 1.0
    gpus: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class EngineConfig:
    target: str  # a local model folder or hub id
    drafter: str | None = None  # a model folder or hub id, `ngram`, `self-int8` / `self-int4`, or None
    backend: Backend = "specray"
    dtype: Dtype = "auto"
    decoder: Decoder = "lean"
    max_batch_size: int = 128  # a job call's rows (resources.batch_size) at once: 1.08-1.10x batches of 64 (bf16, Zen 4)
    # The target's KV caches, in GB in all: > 0, sized once to that (every slot the same number of positions); 0, on
    # CUDA 85% of the memory free after loading, on a CPU sized by each call's rows (grown between calls)
    kv_cache_gb: float = 0.0
    num_draft_tokens: int | Literal["auto"] = "auto"
    trust_remote_code: bool = False
    compression: Compression = field(default_factory=Compression)
    gpus: float = 0.0  # > 0 with CUDA available: the model runs on cuda
    threads: int = 1  # torch threads of the process that hosts the engine
    parity_check: bool = True  # at load: the decoder against the model's own generate (engine/parity.py)
    drafter_learns: bool = False  # the drafter's weights are replaced during the job (engine/drafter_learning.py)
    capture_topk: int = 0  # keep the target's top-k logits per generated token in each Result (0: none)
    # the lean decoder's decode and verify steps compiled per shape bucket (engine/captured_step.py): torch.compile
    # with CUDA graphs on CUDA, inductor on a CPU; auto: on CUDA only. Off by default until checked on a GPU
    # (benchmarks/gpu_check.py's compiled-step check)
    compile: Compile = "off"

    @property
    def lean(self) -> bool:
        return self.decoder == "lean"
