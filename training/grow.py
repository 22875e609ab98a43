"""Depth growth: a shallow decoder that has learned to look a shape up becomes a deep one with the same function.

Why: at this corpus's scale an 8-layer decoder trained from scratch never learns to find the shape a question
names (it answers about a random shape of the scene). A 2-layer one of the same width began to in one short
run, though longer runs did not hold that up (models/README.md, "Why the questions fail"), so the shipped
config leaves growth off. Were a shallow decoder to learn it, the target must still be deep: its decode step
has to cost ten drafter steps for speculative decoding to pay. So the recipe can train the shallow decoder
first, then grow it: each trained layer is followed by new layers whose output projections (attention's `o_proj`, the
MLP's `down_proj`) start at zero. A pre-norm residual layer with both at zero adds nothing to the stream, so
the grown model computes exactly what the shallow one did; training then goes on with every layer.
"""
from __future__ import annotations

import torch

LAYERS = "model.language_model.layers."
ZEROED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def layer_map(shallow: int, deep: int) -> dict[int, int]:
    """{deep layer: shallow layer it copies}, the trained layers spread evenly (2 -> 8: layers 0 and 4)."""
    if deep % shallow:
        raise ValueError(f"train.target.shallow_layers: {shallow} does not divide the target's {deep} layers")
    return {i * (deep // shallow): i for i in range(shallow)}


@torch.no_grad()
def grow(shallow_model, deep_model):
    """Copy every weight of `shallow_model` into `deep_model` (same config but for the decoder's depth); the deep
    model's other layers keep their fresh initialisation with their output projections zeroed. Returns it."""
    n_old = shallow_model.config.text_config.num_hidden_layers
    n_new = deep_model.config.text_config.num_hidden_layers
    copies = layer_map(n_old, n_new)
    old = shallow_model.state_dict()
    new = deep_model.state_dict()
    for key, value in new.items():
        if not key.startswith(LAYERS):
            value.copy_(old[key])
            continue
        index, _, name = key[len(LAYERS):].partition(".")
        if int(index) in copies:
            value.copy_(old[f"{LAYERS}{copies[int(index)]}.{name}"])
        elif name in ZEROED:
            value.zero_()
    return deep_model
