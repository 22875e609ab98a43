"""Training without paying for padding: a batch's rows differ in length (a caption's answer up to 30 tokens longer
than a yes/no), and padded to the longest, a quarter of the decoder's tokens in a recipe batch are padding. Here
the decoder runs on groups of rows of similar length, each cut to its own longest row, and its outputs are padded
back: the rows are right-padded and attention is causal, so every real position sees exactly what it saw in the
full batch, and the loss and its gradient are the full batch's (tests/training/test_length_groups.py)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

GROUP_COST = 48  # a decoder call's fixed cost, in padded token-rows: a split must save more than this to be made


def plan(lengths: list[int], max_groups: int = 3) -> list[tuple[list[int], int]]:
    """Rows grouped by length to cost the fewest padded tokens (each group padded to its longest row, plus
    GROUP_COST a group): [(row indices, width)], shortest group first."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    ls = [lengths[r] for r in order]
    n = len(ls)
    # best[g][i]: (cost, cuts) of the first i sorted rows in g groups; a group ending at row i - 1 is ls[i - 1] wide
    best = [{0: (0, [])}] + [{} for _ in range(max_groups)]
    for g in range(1, max_groups + 1):
        for i in range(1, n + 1):
            options = [(best[g - 1][j][0] + (i - j) * ls[i - 1] + GROUP_COST, best[g - 1][j][1] + [i])
                       for j in range(i) if j in best[g - 1]]
            if options:
                best[g][i] = min(options)
    _, cuts = min(best[g][n] for g in range(1, max_groups + 1) if n in best[g])
    groups, start = [], 0
    for end in cuts:
        groups.append((order[start:end], ls[end - 1]))
        start = end
    return groups


def _right_padded(mask: torch.Tensor) -> bool:
    lengths = mask.sum(1, keepdim=True)
    return bool((mask == (torch.arange(mask.shape[1], device=mask.device) < lengths)).all())


class LengthGroupedDecoder(nn.Module):
    """A decoder (what a VLM calls `language_model`, or a causal LM's `model`) run on length groups of its batch;
    its output padded back to the batch's width (zeros past each row's end). In training only: no cache."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def get_input_embeddings(self):
        return self.decoder.get_input_embeddings()

    def forward(self, attention_mask: torch.Tensor | None = None, **kwargs):
        if attention_mask is None or attention_mask.dim() != 2 or not _right_padded(attention_mask):
            return self.decoder(attention_mask=attention_mask, **kwargs)
        kwargs["use_cache"] = False
        b, t = attention_mask.shape
        groups = plan(attention_mask.sum(1).tolist())
        outs = []
        for rows, width in groups:
            index = torch.tensor(rows, device=attention_mask.device)
            outs.append(self.decoder(attention_mask=attention_mask[index, :width],
                                     **{k: _rows(k, v, index, width, b, t) for k, v in kwargs.items()}))
        back = torch.argsort(torch.tensor([r for rows, _ in groups for r in rows], device=attention_mask.device))

        def padded(parts, square: bool):  # each group's [g, w, d] (or attention's [g, h, w, w]) -> the batch's
            pads = [(0, t - w, 0, t - w) if square else (0, 0, 0, t - w) for _, w in groups]
            return torch.cat([nn.functional.pad(x, p) for x, p in zip(parts, pads)])[back]

        def each(field: str, square: bool = False):
            layers = getattr(outs[0], field)
            return None if layers is None else tuple(padded([getattr(o, field)[i] for o in outs], square)
                                                     for i in range(len(layers)))

        return BaseModelOutputWithPast(last_hidden_state=padded([o.last_hidden_state for o in outs], False),
                                       hidden_states=each("hidden_states"),
                                       attentions=each("attentions", square=True))


def _rows(name: str, value, index: torch.Tensor, width: int, b: int, t: int):
    """A decoder argument for the group's rows, cut to `width` positions: [b, t, ...] inputs, positions ([b, t],
    or M-RoPE's [3, b, t]), a [t] cache position; anything else as it is."""
    if not torch.is_tensor(value):
        return value
    if name == "position_ids":
        return value[..., index, :width]
    if value.dim() == 1 and value.shape[0] == t:
        return value[:width]
    if value.shape[:2] == (b, t):
        return value[index, :width]
    return value


def _decoder_slot(model: nn.Module) -> tuple[nn.Module, str] | None:
    """Where the model keeps its decoder: a VLM's model.language_model, a causal LM's model."""
    inner = getattr(model, "model", None)
    if inner is None:
        return None
    if isinstance(getattr(inner, "language_model", None), nn.Module):
        return inner, "language_model"
    return model, "model"


@contextlib.contextmanager
def length_grouped(model: nn.Module):
    """Within it, `model`'s decoder runs on length groups of each batch; the same modules, so the optimiser's
    parameters and the saved state are untouched."""
    slot = _decoder_slot(model)
    if slot is None:
        yield model
        return
    owner, name = slot
    decoder = getattr(owner, name)
    setattr(owner, name, LengthGroupedDecoder(decoder))
    try:
        yield model
    finally:
        setattr(owner, name, decoder)
