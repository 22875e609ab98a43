"""Visual-token pruning: keep a fraction of each image's tokens between the projector and the decoder.

Image tokens are most of a captioning prompt (36 of about 50 on the shipped pair, thousands on a real
Qwen2.5-VL at high resolution), and prefill is a large share of a job's time, so the decoder is handed only the
kept image tokens (in their original order, at consecutive
positions; the text around them is untouched). Training-free, two ways to rank them:

- `attention` (FasterVLM): the attention the vision encoder's [CLS] query pays each patch, in the encoder
  layer whose output the projector reads; heads averaged. An encoder without a [CLS] token (SigLIP) ranks
  a patch by the attention it receives from all patches. A tower that merges patches into tokens (Qwen2-VL,
  Qwen2.5-VL: m x m patches per token, window attention in between) ranks a token by the attention its
  patches receive from the whole image in the tower's last block (which attends over the whole image).
- `diversity` (ToDRE's first stage): a greedy max-min subset of the projected image tokens under cosine
  distance: start from the token farthest from the image's mean, then repeatedly add the token farthest
  from everything kept so far. It needs nothing from the encoder, so it works for any tower.

With `tower_layer` (a patch-merging tower only; `diversity` or `spread`), the tokens are chosen inside the tower,
before that block, and the tower's later blocks run on the kept ones alone (engine/tower_pruning.py).
- `spread` (inside the tower only, where each token's place on the image grid is known): `diversity` under
  cosine distance plus the two tokens' distance on the grid (as a fraction of the image's longer side), so the
  kept tokens cover the image. Plain diversity keeps one token of a uniform region and drops its twins, and the
  decoder no longer sees how far a large shape reaches: on the shipped pair, keeping half the tokens inside the
  tower, captions went from 84% (diversity) to 98% (spread) right, against 100% on every token (models/README.md).
"""
from __future__ import annotations

import torch

from engine.config import TOWER_RANKINGS
from engine.tower_pruning import Handles, Ranking, TowerPruning

METHODS = ("attention", "diversity", "spread")
SPREAD_WEIGHT = 1.0  # grid distance against cosine distance; 0.3 and 3.0 kept 96% of captions, 1.0 98%


def _encoder_layers(model) -> list | None:
    tower = getattr(getattr(model, "model", model), "vision_tower", None)
    for path in ("vision_model.encoder.layers", "encoder.layers"):
        node = tower
        for name in path.split("."):
            node = getattr(node, name, None)
        if node is not None:
            return list(node)
    return None


class VisualTokenPruner:
    def __init__(self, model, config, keep: float, method: str, merge: bool = False, tower_layer: int | None = None):
        if not 0 < keep <= 1:
            raise ValueError(f"compression.visual_tokens.keep: must be in (0, 1], not {keep}")
        if method not in METHODS:
            raise ValueError(f"compression.visual_tokens.method: one of {', '.join(METHODS)}, not {method!r}")
        self.keep, self.method, self.merge_pruned = keep, method, merge
        self.layer = self.tower = None
        self._captured: torch.Tensor | dict | None = None
        self._scores: list[torch.Tensor] | None = None  # a merging tower's per-image scores, once computed
        self.in_tower: TowerPruning | None = None
        if tower_layer is not None:
            self.in_tower = _tower_pruning(model, config, keep, method, merge, tower_layer)
            return
        if method == "spread":
            raise ValueError("compression.visual_tokens.method: spread ranks tokens inside the vision tower, where their "
                             "places on the image are known; set tower_layer (a patch-merging tower), or use diversity")
        if method == "attention":
            layers = _encoder_layers(model)
            self.tower = _merging_tower(model) if not layers else None
            if self.tower is not None:
                self.layer = self.tower.blocks[-1]
            elif not layers or not hasattr(layers[0], "self_attn"):
                raise ValueError(f"compression.visual_tokens.method: attention needs a CLIP/SigLIP-style vision "
                                 f"encoder or a patch-merging tower, which {config.model_type} does not have; "
                                 "use diversity")
            if self.tower is not None:
                return
            feature_layer = getattr(config, "vision_feature_layer", -1)
            if isinstance(feature_layer, (list, tuple)):
                feature_layer = feature_layer[-1]
            # hidden_states[i] is the output of layer i-1 (index 0: the embeddings)
            self.layer = layers[feature_layer] if feature_layer < 0 else layers[max(0, feature_layer - 1)]

    def hook(self):
        """Install the capture of the scoring layer's attention input (attention method); returns the handle."""
        if self.in_tower is not None:
            return self.in_tower.hook()
        if self.layer is None:
            return None
        if self.tower is not None:
            return self._hook_merging_tower()

        def capture(_module, args, kwargs):
            self._captured = kwargs.get("hidden_states", args[0] if args else None)

        return self.layer.self_attn.register_forward_pre_hook(capture, with_kwargs=True)

    def _attention_scores(self) -> torch.Tensor:
        """[images, tokens] of the captured layer: the [CLS] row of the attention (or the column mean)."""
        attn, h = self.layer.self_attn, self._captured.float()
        b, t, _ = h.shape
        heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
        q = torch.nn.functional.linear(h, attn.q_proj.weight.float(), _f(attn.q_proj.bias))
        k = torch.nn.functional.linear(h, attn.k_proj.weight.float(), _f(attn.k_proj.bias))
        q, k = (x.view(b, t, heads, -1).transpose(1, 2) for x in (q, k))
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1).mean(1)  # [b, t, t]
        self._captured = None
        return probs

    @property
    def per_image(self) -> bool:
        """Whether images of different sizes in one batch can be ranked (each image's scores are its own)."""
        return self.method == "diversity" or self.tower is not None or self.in_tower is not None

    def select(self, image_embeds: torch.Tensor, images: list[int] | None = None) -> torch.Tensor:
        """image_embeds [images, m, hidden] (the tokens the decoder would see) -> kept indices [images, n], sorted.
        `images`: which of the images the tower last encoded these are (default: all of them, in order)."""
        b, m, _ = image_embeds.shape
        n = max(1, round(self.keep * m))
        if n >= m:
            return torch.arange(m, device=image_embeds.device).expand(b, m)
        if self.in_tower is not None:  # chosen in the tower, which encoded only these
            kept = [self.in_tower.kept[i] for i in (images if images is not None else range(b))]
            if any(len(k) != n for k in kept):  # a prompt's tokens are not one image's
                raise ValueError("compression.visual_tokens.tower_layer: pruning inside the tower needs one image "
                                 "per prompt")
            return torch.stack(kept).to(image_embeds.device)
        if self.method == "attention" and self.tower is not None:
            scores = self._merged_scores()
            scores = torch.stack([scores[i] for i in (images if images is not None else range(len(scores)))])
            kept = scores.to(image_embeds.device).topk(n, dim=-1).indices
        elif self.method == "attention":
            probs = self._attention_scores().to(image_embeds.device)  # [b, t, t]
            t = probs.shape[-1]
            if t == m + 1:  # a [CLS] token the projector dropped: its attention to the patches
                scores = probs[:, 0, 1:]
            elif t == m:  # no [CLS]: the attention each token receives
                scores = probs.mean(1)
            else:
                raise ValueError(f"compression.visual_tokens: the encoder has {t} tokens for {m} image tokens; "
                                 "attention ranking needs one image token per patch (use diversity)")
            kept = scores.topk(n, dim=-1).indices
        else:
            kept = _max_min_subset(image_embeds.float(), n)
        return kept.sort(-1).values

    def _hook_merging_tower(self):
        captured: dict = {}

        def grid(_module, args, kwargs):
            captured["grid_thw"] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        def attention_input(_module, args, kwargs):
            captured.update(hidden=kwargs.get("hidden_states", args[0] if args else None),
                            cu_seqlens=kwargs["cu_seqlens"], rotary=kwargs.get("position_embeddings"))

        self._captured, self._scores = captured, None
        handles = [self.tower.register_forward_pre_hook(grid, with_kwargs=True),
                   self.layer.attn.register_forward_pre_hook(attention_input, with_kwargs=True)]
        return Handles(handles)

    def _merged_scores(self) -> list[torch.Tensor]:
        """Per image the tower last encoded, per token: the attention its patches receive from every patch of its
        image (heads and queries averaged) in the tower's last block, in the tokens' own (row-major) order."""
        import sys

        if self._scores is not None:
            return self._scores
        c = self._captured
        attn, h = self.layer.attn, c["hidden"].float()
        t = h.shape[0]
        heads = attn.num_heads
        q, k, _ = torch.nn.functional.linear(h, attn.qkv.weight.float(), _f(attn.qkv.bias)).view(t, 3, heads, -1).unbind(1)
        if c["rotary"] is not None:
            rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
            q, k = rotate(q, k, *(x.float() for x in c["rotary"]))
        unit = self.tower.spatial_merge_size ** 2
        received = torch.zeros(t, device=h.device)
        bounds = c["cu_seqlens"].tolist()
        for a, z in zip(bounds[:-1], bounds[1:]):  # one image per segment in a full-attention block
            qi, ki = q[a:z].transpose(0, 1), k[a:z].transpose(0, 1)  # [heads, len, d]
            probs = torch.softmax(qi @ ki.transpose(-1, -2) / qi.shape[-1] ** 0.5, -1)  # [heads, len, len]
            received[a:z] = probs.mean((0, 1))
        per_unit = received.view(-1, unit).sum(1)  # merged tokens, in the tower's (window) order
        if hasattr(self.tower, "window_size"):  # Qwen2.5-VL: back to row-major order, as the merger's output is
            from transformers.vision_utils import get_vision_window_index

            window, _ = get_vision_window_index(c["grid_thw"], self.tower.spatial_merge_size, self.tower.window_size,
                                                self.tower.patch_size)
            per_unit = per_unit[torch.argsort(window.to(per_unit.device))]
        sizes = [(z - a) // unit for a, z in zip(bounds[:-1], bounds[1:])]
        self._scores = list(per_unit.split(sizes))
        return self._scores

    def merge(self, image_embeds: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Kept tokens [b, n, d], each averaged with the pruned tokens closest to it (cosine)."""
        b, m, d = image_embeds.shape
        x = image_embeds.float()
        unit = torch.nn.functional.normalize(x, dim=-1)
        rows = torch.arange(b, device=x.device)[:, None]
        sim = unit @ unit[rows, kept].transpose(1, 2)  # [b, m, n]
        nearest = sim.argmax(-1)  # [b, m]
        nearest[rows, kept] = torch.arange(kept.shape[1], device=x.device).expand_as(kept)
        total = torch.zeros(b, kept.shape[1], d, device=x.device).scatter_add_(1, nearest[..., None].expand(b, m, d), x)
        count = torch.zeros(b, kept.shape[1], device=x.device).scatter_add_(1, nearest, torch.ones(b, m, device=x.device))
        return (total / count[..., None]).to(image_embeds.dtype)


def _tower_pruning(model, config, keep: float, method: str, merge: bool, layer: int) -> TowerPruning:
    tower = getattr(getattr(model, "model", model), "visual", None)
    if tower is None or not hasattr(tower, "spatial_merge_size") or not hasattr(tower, "merger") \
            or getattr(tower.config, "deepstack_visual_indexes", None) or not getattr(tower, "blocks", None):
        raise ValueError(f"compression.visual_tokens.tower_layer: pruning inside the tower needs a patch-merging "
                         f"vision tower (Qwen2-VL, Qwen2.5-VL), which {config.model_type} does not have")
    if method not in TOWER_RANKINGS:
        raise ValueError("compression.visual_tokens.method: pruning inside the tower ranks by diversity or spread, "
                         f"not {method!r}")
    if merge:
        raise ValueError("compression.visual_tokens.merge: the tower never encodes the tokens it prunes, so there is "
                         "nothing to merge; with tower_layer set, merge must be false")
    return TowerPruning(tower, keep, layer, tower_ranking(method))


def tower_ranking(method: str) -> Ranking:
    """The ranking `method` (diversity or spread) names, as the tower calls it: (features, n, places) -> kept."""
    if method == "spread":
        return lambda feats, n, places: _max_min_subset(feats.float(), n, places, SPREAD_WEIGHT)
    return lambda feats, n, places: _max_min_subset(feats.float(), n)


def _merging_tower(model):
    """A vision tower that merges m x m patches into each token and whose last block attends over the whole image
    (Qwen2-VL, Qwen2.5-VL), or None."""
    tower = getattr(getattr(model, "model", model), "visual", None)
    blocks = getattr(tower, "blocks", None)
    if tower is None or not blocks or not hasattr(tower, "spatial_merge_size") or not hasattr(blocks[-1], "attn"):
        return None
    full = getattr(tower, "fullatt_block_indexes", None)
    if full is not None and len(blocks) - 1 not in full:  # a windowed last block sees only part of the image
        return None
    if not hasattr(blocks[-1].attn, "qkv") or getattr(tower.config, "deepstack_visual_indexes", None):
        return None
    return tower


def _f(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _max_min_subset(x: torch.Tensor, n: int, places: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
    """Greedy farthest-point selection of n of the m rows of each x [b, m, d] under cosine distance; with
    `places` [b, m, k] (each row's coordinates), plus `weight` times the rows' euclidean distance there."""
    b, m, _ = x.shape
    unit = torch.nn.functional.normalize(x, dim=-1)
    sim = unit @ unit.transpose(1, 2)  # [b, m, m]
    if places is not None:  # a similarity lowered by distance: greedy on (1 - sim) + weight * distance
        sim = sim - weight * torch.cdist(places.float(), places.float())
    mean = torch.nn.functional.normalize(unit.mean(1, keepdim=True), dim=-1)
    first = (unit @ mean.transpose(1, 2)).squeeze(-1).argmin(-1)  # the token farthest from the mean
    rows = torch.arange(b, device=x.device)
    picked = [first]
    closest = sim[rows, first]  # [b, m]: each token's similarity to its nearest kept token
    for _ in range(n - 1):
        closest = closest.clone()
        closest[rows[:, None], torch.stack(picked, 1)] = float("inf")
        nxt = closest.argmin(-1)
        picked.append(nxt)
        closest = torch.maximum(closest, sim[rows, nxt])
    return torch.stack(picked, 1)
