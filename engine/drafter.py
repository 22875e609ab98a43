"""Drafters: what proposes tokens for the target to verify. All share one interface with the engine:

    admit(first, prompts, arrays)    new sequences enter slots first.. (prefill)
    propose(histories, k, params)   -> drafts [n, k], num_drafts [n], draft_probs [n, k, V] or None
    submit(...) / collect(handle)    the same, split so that a remote drafter (actors/drafter_channel.py) drafts
                                     while the target verifies another group; collect adds the draft seconds
    commit(accepted)                 the verdict: roll each row back to its accepted prefix (rounds without
                                     drafting need no call: a model drafter catches up on its next proposal)
    move(src, dst)                   compaction when sequences leave
    fork()                           another drafter over the same weights with no sequences of its own: one
                                     per group of sequences (a target's groups, a drafter server's channels)

- ModelDrafter (engine/model_drafter.py): a small model with its own KV cache, run by the same lean decoder as
  the target. A VLM drafter sees the image through its own tower; a text-only drafter sees the prompt without
  image tokens.
- NgramDrafter (engine/ngram_drafter.py): model-free prompt lookup.

Vocabularies. A model drafter may have a smaller vocabulary than the target's (Qwen2.5-0.5B under Qwen2.5-VL: the
target's tokenizer appends vision tokens, and either model's embedding may carry padding rows past its tokenizer).
It is accepted when the two tokenizers agree on the shared ids: every token of the drafter's tokenizer (added and
special tokens included) has the same id in the target's; the target may have more tokens after them. Anything
else is refused at load (`check_agreement`).

The banned ids (computed once at load: `target_vocab`, and `draft_mask` for a model drafter): no drafter ever proposes
- an id outside its own tokenizer or the target's (a model drafter's logit columns past its tokenizer, i.e.
  embedding padding rows, and past the target's logits width; ids no token has);
- an image/video placeholder of either model (config image_token_id / image_token_index, video_token_id,
  vision_start/end_token_id (Qwen-VL), boi/eoi_token_id|index (Gemma3), ...: `placeholder_ids`), but never the
  target's EOS, even where a config also names it a vision boundary (a pair may end its image spans with EOS);
- a special token of the target's tokenizer (its named special tokens and added tokens marked special) other
  than its EOS ids: ending a row is a legitimate proposal, a chat-control or padding token is not.
A model drafter's logits ban them (-inf); the n-gram drafter stops a proposal at the first banned id and never
looks at image placeholders. With sampling, a drafter's probabilities are over its own logits' width; the
speculative round zero-pads (or truncates banned columns) to the target's width (engine/speculative.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import SELF_DRAFTERS, WEIGHT_BITS, Compression
from engine.model import LoadedModel, eos_ids
from engine.model_drafter import ModelDrafter
from engine.ngram_drafter import NgramDrafter

# config keys that name an image/video placeholder or a vision boundary token (LLaVA, Qwen-VL, Gemma3, ...)
PLACEHOLDER_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index",
                    "vision_start_token_id", "vision_end_token_id", "vision_token_id", "boi_token_id",
                    "boi_token_index", "eoi_token_id", "eoi_token_index", "audio_token_id", "audio_token_index")


def placeholder_ids(config) -> set[int]:
    """The placeholder and vision boundary ids a model config names (at its top level or in its text config)."""
    configs = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        configs.append(text)
    out = set()
    for c in configs:
        for key in PLACEHOLDER_KEYS:
            value = getattr(c, key, None)
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, int) and not isinstance(t, bool) and t >= 0:
                    out.add(t)
    return out


def special_ids(tokenizer, keep: set[int]) -> set[int]:
    """The tokenizer's special tokens (its named ones and every added token marked special), but `keep` (EOS)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids - set(keep) - {None}


def logits_width(config) -> int:
    """A model's logits width: its (text) config's vocab_size, the embedding rows, padding rows included."""
    return config.get_text_config().vocab_size


@dataclass(frozen=True)
class TargetVocab:
    """What every drafter must respect of its target, computed once at load."""
    name: str  # the target's path (for messages)
    width: int  # the target's logits width (config vocab_size)
    size: int  # 1 + the largest id of the target's tokenizer (ids from size to width are padding rows)
    banned: frozenset[int]  # placeholders, special tokens but EOS, and ids below `size` no token has
    eos: frozenset[int] = frozenset()  # never banned, even where a config also names it a vision boundary


def target_vocab(tokenizer, image_token_id: int | None, target: LoadedModel | str | None = None,
                 trust_remote_code: bool = False) -> TargetVocab:
    """The target's vocabulary and banned ids, from its LoadedModel or its path (a drafter server: config only);
    without either, from its tokenizer alone."""
    from transformers import AutoConfig, GenerationConfig

    config = None
    if isinstance(target, LoadedModel):
        config, eos, name = target.model.config, set(target.eos_ids), target.path
    elif isinstance(target, str):
        config, name = AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code), target
        try:
            generation = GenerationConfig.from_pretrained(target)
        except (OSError, ValueError):
            generation = GenerationConfig.from_model_config(config)
        eos = eos_ids(generation, tokenizer)
    else:
        eos, name = {tokenizer.eos_token_id} - {None}, tokenizer.name_or_path
    ids = set(tokenizer.get_vocab().values())
    size = max(ids) + 1
    banned = special_ids(tokenizer, eos) | {image_token_id} - {None} | (set(range(size)) - ids)
    if config is not None:
        banned |= placeholder_ids(config) - eos  # a model may end its image spans with EOS: it must stay proposable
    return TargetVocab(str(name), logits_width(config) if config is not None else size, size, frozenset(banned),
                       frozenset(eos))


def check_agreement(drafter_tokenizer, target_tokenizer, drafter_name: str, target_name: str) -> None:
    """Refuse a drafter whose tokenizer is not the target's on the shared ids: every drafter token (added and
    special ones included) must have the same id in the target's tokenizer (which may have more tokens)."""
    target = target_tokenizer.get_vocab()
    for token, i in sorted(drafter_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        j = target.get(token)
        if j != i:
            there = "is missing" if j is None else f"has id {j}"
            raise ValueError(f"model.drafter: {drafter_name} does not share the tokenizer of the target {target_name}: "
                             f"its token {token!r} (id {i}) {there} in the target's")


def draft_mask(model: LoadedModel, vocab: TargetVocab) -> torch.Tensor:
    """A model drafter's banned logit columns [its logits width] (True: never proposed): every column but the ids
    of its own tokenizer below the target's width, the target's banned ids and the drafter's own placeholders."""
    allowed = torch.zeros(logits_width(model.model.config), dtype=torch.bool)
    ids = [i for i in model.tokenizer.get_vocab().values() if i < min(len(allowed), vocab.width)]
    allowed[ids] = True
    own = placeholder_ids(model.model.config) - vocab.eos
    banned = [i for i in vocab.banned | own | {model.image_token_id} - {None} if i < len(allowed)]
    allowed[banned] = False
    return ~allowed


def make_drafter(spec: str, tokenizer, image_token_id: int | None, device: str, dtype: torch.dtype,
                 trust_remote_code: bool = False, lean: bool = True, compression: Compression | None = None,
                 target: LoadedModel | str | None = None, learning: bool = False):
    """The drafter `model.drafter` names, checked against the target's tokenizer and image token; its banned ids
    (module docstring) come from the target (its LoadedModel, or its path on a drafter server).

    `self-int8` / `self-int4`: the target drafts for itself with quantized weights. Given the target's
    LoadedModel (built with self_draft_bits), the drafter shares its tower, embedding and head and adds only
    the quantized linears; given the target's path (a drafter server), it loads the target quantized.
    `learning`: a model drafter whose weights the job replaces as it learns (LoadedModel.load_weights)."""
    vocab = target_vocab(tokenizer, image_token_id, target, trust_remote_code)
    if learning and (spec == "ngram" or spec in SELF_DRAFTERS):
        raise ValueError(f"model.drafter_training: the drafter must be a model to learn, not {spec}")
    if spec == "ngram":
        return NgramDrafter(set(vocab.banned), image_token_id=image_token_id, limit=vocab.size, device=device)
    if spec in SELF_DRAFTERS:
        if isinstance(target, LoadedModel):
            if target.self_decoder is None:  # asked for after the target was loaded (a target actor's plan)
                if target.decoder.quantized is not None:
                    raise ValueError(f"model.drafter: {spec} needs the target's dense weights, and "
                                     "compression.weights already quantized them")
                target.self_decoder = target.decoder.quantized_copy(WEIGHT_BITS[SELF_DRAFTERS[spec]],
                                                                    target.compression.group_size)
            ck = target.with_decoder(target.self_decoder)
        elif isinstance(target, str):
            ck = LoadedModel(target, device, dtype, trust_remote_code=trust_remote_code, lean=lean,
                             compression=compression or Compression(SELF_DRAFTERS[spec]))
        else:
            raise ValueError(f"model.drafter: {spec} needs the target model")
        return ModelDrafter(ck, draft_mask(ck, vocab), image_token_id)
    from transformers import AutoTokenizer

    # refused before its weights load
    check_agreement(AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code), tokenizer, spec,
                    vocab.name)
    ck = LoadedModel(spec, device, dtype, trust_remote_code=trust_remote_code, lean=lean, compression=compression,
                     learning=learning)
    if ck.is_vlm and ck.image_token_id != image_token_id:
        raise ValueError(f"model.drafter: {spec} uses a different image token than the target {vocab.name}")
    return ModelDrafter(ck, draft_mask(ck, vocab), image_token_id)
