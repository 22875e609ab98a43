"""Visual-token dropout: train the target on prompts from which image tokens were removed, as the engine's
pruning removes them at inference (engine/visual_tokens.py), so that pruning costs it nothing.

A training step with dropout runs the model's own pieces: the vision tower and merger, the placeholder
scatter and the model's own 3-axis M-RoPE positions (`get_rope_index`), then drops image tokens and hands
the language model only the kept ones, each at its original (t, h, w) position: exactly what the engine
hands its decoder after pruning. Which tokens survive is drawn per batch: uniformly at random, or the
engine's own ranking (`diversity`, a max-min subset of the projected tokens), at a keep fraction drawn from
the config's list. `tower-diversity`, `tower-spread` and `tower-random` drop them inside the vision tower
instead, before block `tower_layer`, as the engine's in-tower pruning does (engine/tower_pruning.py): the tower's later blocks, the
merger and the decoder all see only the kept tokens. With attention supervision (training/attention_supervision.py) the step supervises the heads
too, onto the asked shape's tokens that were kept: the lookup is learned on pruned prompts as well.
"""
from __future__ import annotations

import random

import torch

from engine.tower_pruning import TowerPruning
from engine.visual_tokens import tower_ranking
from training.attention_supervision import attention_loss


def _ranked(feats: torch.Tensor, n: int, method: str, generator: torch.Generator,
            places: torch.Tensor | None = None) -> torch.Tensor:
    """feats [images, m, d] -> the indices of n of each image's m tokens [images, n] (random, diversity, or
    spread: diversity plus the tokens' distance on the grid, `places` [images, m, 3])"""
    b, m, _ = feats.shape
    if method.endswith("random"):
        return torch.stack([torch.randperm(m, generator=generator)[:n] for _ in range(b)]).to(feats.device)
    return tower_ranking(method.removeprefix("tower-"))(feats.detach(), n, places)


def _kept_image_tokens(feats: torch.Tensor, keep: float, method: str, generator: torch.Generator) -> torch.Tensor:
    """feats [images, m, d] -> kept indices [images, n], sorted."""
    m = feats.shape[1]
    n = max(1, round(keep * m))
    if n >= m:
        return torch.arange(m, device=feats.device).expand(feats.shape[0], m)
    return _ranked(feats, n, method, generator).sort(-1).values


def kept_asked(asked: torch.Tensor, kept: torch.Tensor, m: int) -> torch.Tensor:
    """asked [b, w] (indices among a row's m image tokens, -1 padding), kept [b, n] -> the asked tokens' indices
    among the row's kept image tokens, -1 where a token was dropped."""
    b, n = kept.shape
    new_index = torch.full((b, m), -1, dtype=torch.long)
    new_index.scatter_(1, kept, torch.arange(n).expand(b, n))
    return torch.where(asked >= 0, new_index.gather(1, asked.clamp(min=0)), -1)


def dropout_loss(model, batch: dict, keep: float, method: str, generator: torch.Generator,
                 attend=None, tower_layer: int = 1) -> torch.Tensor:
    """The causal-LM loss of a Qwen2.5-VL batch (one image per row) with only `keep` of each image's tokens;
    with `attend` (an AttentionSupervision) and the batch's `asked`, plus its attention loss on the kept tokens.
    A `tower-` method drops them inside the vision tower, before block `tower_layer`."""
    inner = model.model
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    grid = batch["image_grid_thw"]
    embeds = inner.get_input_embeddings()(ids)
    in_tower = None
    if method.startswith("tower-"):
        in_tower = TowerPruning(inner.visual, keep, tower_layer,
                                lambda f, n, places: _ranked(f, n, method, generator, places))
    handle = in_tower.hook() if in_tower else None
    try:
        feats = torch.cat(inner.get_image_features(batch["pixel_values"], grid).pooler_output).to(embeds.dtype)
    finally:
        if handle:
            handle.remove()
    is_image = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(is_image[..., None].expand_as(embeds), feats)
    positions, _ = inner.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=grid,
                                        attention_mask=mask)  # [3, b, t]
    b, t = ids.shape
    m = int(is_image[0].sum())
    if in_tower:  # the tower chose them (its output is zero at the others)
        kept = torch.stack(in_tower.kept).to(ids.device)
    else:
        kept = _kept_image_tokens(feats.view(b, m, -1), keep, method, generator)  # [b, n]
    # each row: its text tokens, and its kept image tokens in their place (every row has one image of m tokens)
    image_cols = is_image.nonzero()[:, 1].view(b, m)
    keep_mask = ~is_image
    keep_mask[torch.arange(b)[:, None], image_cols.gather(1, kept)] = True
    cols = keep_mask.nonzero()[:, 1].view(b, -1)
    rows = torch.arange(b)[:, None]
    supervised = attend is not None and "asked" in batch
    out = inner.language_model(inputs_embeds=embeds[rows, cols], attention_mask=mask[rows, cols],
                               position_ids=positions[:, rows, cols], output_attentions=supervised)
    logits = model.lm_head(out.last_hidden_state).float()
    kept_labels = labels[rows, cols]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             kept_labels[:, 1:].reshape(-1), ignore_index=-100)
    if supervised:
        pruned = {"input_ids": ids[rows, cols], "labels": kept_labels, "asked": kept_asked(batch["asked"], kept, m)}
        extra = attention_loss(out.attentions, pruned, model.config.image_token_id, attend.heads)
        loss = loss if extra is None else loss + attend.weight * extra
    return loss


METHODS = ("random", "diversity", "tower-random", "tower-diversity", "tower-spread")  # spread: in the tower only


class TokenDropout:
    """The per-batch draw: with probability `p`, a keep fraction from `keep` and a method from `methods`."""

    def __init__(self, spec: dict | None, seed: int):
        spec = spec or {}
        self.p = float(spec.get("p", 0.0))
        self.keep = list(spec.get("keep", [0.25, 0.5, 0.75]))
        self.methods = list(spec.get("methods", ["random", "diversity"]))
        if unknown := sorted(set(self.methods) - set(METHODS)):
            raise ValueError(f"token_dropout.methods: unknown {unknown[0]!r} (methods: {', '.join(METHODS)})")
        self.tower_layer = int(spec.get("tower_layer", 1))  # the block before which tower- methods drop tokens
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def loss(self, model, batch: dict, plain, attend=None) -> torch.Tensor:
        """The batch's loss with dropout drawn (supervised by `attend` when given), else `plain(model, batch)`."""
        if self.p > 0 and "image_grid_thw" in batch and self.rng.random() < self.p:
            return dropout_loss(model, batch, self.rng.choice(self.keep), self.rng.choice(self.methods),
                                self.generator, attend, self.tower_layer)
        return plain(model, batch)
