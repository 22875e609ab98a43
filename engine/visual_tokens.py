"""Visual-token pruning: keep a fraction of each image's tokens between the projector and the decoder.

Image tokens are most of a captioning prompt (64 of about 80 here), and prefill is a large share of a job's
time, so the decoder is handed only the kept image tokens (in their original order, at consecutive
positions; the text around them is untouched). Training-free, two ways to rank them:

- `attention` (FasterVLM): the attention the vision encoder's [CLS] query pays each patch, in the encoder
  layer whose output the projector reads; heads averaged. An encoder without a [CLS] token (SigLIP) ranks
  a patch by the attention it receives from all patches.
- `diversity` (ToDRE's first stage): a greedy max-min subset of the projected image tokens under cosine
  distance: start from the token farthest from the image's mean, then repeatedly add the token farthest
  from everything kept so far. It needs nothing from the encoder, so it works for any tower.
"""
from __future__ import annotations

import torch

METHODS = ("attention", "diversity")


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
    def __init__(self, model, config, keep: float, method: str, merge: bool = False):
        if not 0 < keep <= 1:
            raise ValueError(f"compression.visual_tokens.keep: must be in (0, 1], not {keep}")
        if method not in METHODS:
            raise ValueError(f"compression.visual_tokens.method: one of {', '.join(METHODS)}, not {method!r}")
        self.keep, self.method, self.merge_pruned = keep, method, merge
        self.layer = None
        if method == "attention":
            layers = _encoder_layers(model)
            if not layers or not hasattr(layers[0], "self_attn"):
                raise ValueError(f"compression.visual_tokens.method: attention needs a CLIP/SigLIP-style vision "
                                 f"encoder, which {config.model_type} does not have; use diversity")
            feature_layer = getattr(config, "vision_feature_layer", -1)
            if isinstance(feature_layer, (list, tuple)):
                feature_layer = feature_layer[-1]
            # hidden_states[i] is the output of layer i-1 (index 0: the embeddings)
            self.layer = layers[feature_layer] if feature_layer < 0 else layers[max(0, feature_layer - 1)]
        self._captured: torch.Tensor | None = None

    def hook(self):
        """Install the capture of the scoring layer's attention input (attention method); returns the handle."""
        if self.layer is None:
            return None

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

    def select(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds [images, m, hidden] (the tokens the decoder would see) -> kept indices [images, n], sorted."""
        b, m, _ = image_embeds.shape
        n = max(1, round(self.keep * m))
        if n >= m:
            return torch.arange(m, device=image_embeds.device).expand(b, m)
        if self.method == "attention":
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


def _f(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _max_min_subset(x: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy farthest-point selection of n of the m rows of each x [b, m, d] under cosine distance."""
    b, m, _ = x.shape
    unit = torch.nn.functional.normalize(x, dim=-1)
    sim = unit @ unit.transpose(1, 2)  # [b, m, m]
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
