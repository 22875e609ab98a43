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

No drafter ever proposes an image placeholder token: a model drafter's logits ban it, and the n-gram drafter
never looks at image tokens.
"""
from __future__ import annotations

import time

import torch

from engine.config import SELF_DRAFTERS, WEIGHT_BITS, Compression
from engine.model import LoadedModel
from engine.request import SamplingParams


def make_drafter(spec: str, tokenizer, image_token_id: int | None, device: str, dtype: torch.dtype,
                 trust_remote_code: bool = False, lean: bool = True, compression: Compression | None = None,
                 target: LoadedModel | str | None = None):
    """The drafter `model.drafter` names, checked against the target's tokenizer and image token.

    `self-int8` / `self-int4`: the target drafts for itself with quantized weights. Given the target's
    LoadedModel (built with self_draft_bits), the drafter shares its tower, embedding and head and adds only
    the quantized linears; given the target's path (a drafter server), it loads the target quantized."""
    from engine.model_drafter import ModelDrafter
    from engine.ngram_drafter import NgramDrafter

    if spec == "ngram":
        return NgramDrafter(image_token_id, device=device)
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
        return ModelDrafter(ck, {image_token_id} - {None}, image_token_id)
    ck = LoadedModel(spec, device, dtype, trust_remote_code=trust_remote_code, lean=lean, compression=compression)
    if ck.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"model.drafter: {spec} does not share the target's tokenizer")
    if ck.is_vlm and ck.image_token_id != image_token_id:
        raise ValueError(f"model.drafter: {spec} uses a different image token than the target")
    banned = {t for t in (image_token_id, ck.image_token_id) if t is not None}
    return ModelDrafter(ck, banned, image_token_id)


class LocalDrafter:
    """submit/collect for a drafter in the engine's own process: it drafts at once (nothing overlaps)."""
    remote = False

    def submit(self, histories: list[list[int]], k: int, params: SamplingParams):
        t0 = time.perf_counter()
        drafts, num, probs = self.propose(histories, k, params)
        if drafts.device.type == "cuda":
            torch.cuda.synchronize()
        return drafts, num, probs, time.perf_counter() - t0

    def collect(self, handle):
        return handle
