"""Attention supervision: teach a few decoder heads to look at the shape a question asks about.

A question about one shape ("What color is the diamond?", "Where is the red circle?") is answered by finding that
shape's image tokens and reading them. The tower's tokens carry what is needed (a one-layer probe over them answers
97-98% of colour questions), yet the trained decoder's heads attend to every shape alike (models/README.md, "Why the
questions fail"). The corpus knows where the asked shape is: its grid cell, which is a fixed square of image tokens.
So, besides the language-model loss, each supervised head is pushed to put its attention, at every position that
predicts an answer token, on that cell's tokens: the loss is the mean of -log(attention mass on the cell).

Used by the recipe's steps that run the model's own forward (training/train.py); batches carry `asked`: per row the
indices (among the row's image tokens, in the model's order) of the asked shape's tokens (of the empty cells' when an
exists question names a shape that is not there), or -1 where a question asks about no single shape (captions,
counts, text).
"""
from __future__ import annotations

import re

import torch

from scenes import corpus

# the question's words that name the asked shape (kind, colour, or both), and whether a question about a shape that
# is not there is answered by looking at the empty cells (exists: nothing matches, so the answer is no)
_ASKS = [
    (re.compile(r"What color is the (\w+)\?"), lambda m, s: s.kind == m.group(1), False),
    (re.compile(r"What shape is the (\w+) object\?"), lambda m, s: s.color == m.group(1), False),
    (re.compile(r"Where is the (\w+) (\w+)\?"), lambda m, s: s.color == m.group(1) and s.kind == m.group(2), False),
    (re.compile(r"Is there an? (\w+) (\w+)\?"), lambda m, s: s.color == m.group(1) and s.kind == m.group(2), True),
]
TEXT_ROW = (3, 4, 5)  # the cells a written word runs across


def asked_cells(question: str, scene: corpus.Scene) -> list[int]:
    """The grid cells (0-8) a supervised head should look at to answer: the one shape the question names; for an
    exists question about a shape that is not there, the empty cells (nothing matches, so the head reads
    background and the answer is no); [] for questions about no single shape (captions, counts, text)."""
    for pattern, matches, empty_when_absent in _ASKS:
        m = pattern.fullmatch(question)
        if not m:
            continue
        found = [s.cell for s in scene.shapes if matches(m, s)]
        if len(found) == 1:
            return found
        if not found and empty_when_absent:
            taken = {s.cell for s in scene.shapes} | (set(TEXT_ROW) if scene.word else set())
            return [c for c in range(9) if c not in taken]
        return []
    return []


def cell_tokens(cells: list[int], tokens_per_side: int) -> list[int]:
    """The image tokens (raster order over a tokens_per_side square) that cover these cells of the corpus's 3x3
    grid; [] when cells do not fall on whole tokens."""
    if tokens_per_side % 3:
        return []
    side = tokens_per_side // 3
    return [((cell // 3) * side + r) * tokens_per_side + (cell % 3) * side + c
            for cell in cells for r in range(side) for c in range(side)]


def asked_tensor(rows: list[list[int]]) -> torch.Tensor:
    """Per row its asked tokens, padded with -1: [rows, width] (width 1 when no row has any)."""
    width = max([len(r) for r in rows] + [1])
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)


def attention_loss(attentions: tuple[torch.Tensor, ...], batch: dict, image_token_id: int,
                   heads: list[tuple[int, int]]) -> torch.Tensor | None:
    """Mean over the supervised (layer, head)s and the rows that ask about a shape of -log(attention mass that a
    position predicting an answer token puts on the asked shape's tokens); None when no row asks about one."""
    ids, labels, asked = batch["input_ids"], batch["labels"], batch["asked"]
    terms = []
    for r in range(ids.shape[0]):
        cells = asked[r][asked[r] >= 0]
        if not len(cells):
            continue
        keys = (ids[r] == image_token_id).nonzero().squeeze(1)[cells]
        answer = (labels[r] != -100).nonzero().squeeze(1)
        queries = torch.arange(int(answer[0]) - 1, int(answer[-1]), device=ids.device)  # they predict the answer
        for layer, head in heads:
            mass = attentions[layer][r, head][queries][:, keys].float().sum(-1)  # summed in float32 under autocast
            terms.append(-torch.log(mass + 1e-6).mean())
    return torch.stack(terms).mean() if terms else None


class AttentionSupervision:
    """The recipe's `attend` setting: {weight, heads: [[layer, head], ...]}; off when absent or weight 0."""

    def __init__(self, spec: dict | None):
        spec = spec or {}
        self.weight = float(spec.get("weight", 0.0))
        self.heads = [tuple(h) for h in spec.get("heads", [[2, 0], [4, 0]])]

    def __bool__(self) -> bool:
        return self.weight > 0

    def check(self, model) -> None:
        """A supervised head the decoder does not have is a config error, said before any step."""
        text = model.config.get_text_config()
        self.check_shape(text.num_hidden_layers, text.num_attention_heads)

    def check_shape(self, layers: int, heads: int) -> None:
        for layer, head in self.heads:
            if not (0 <= layer < layers and 0 <= head < heads):
                raise ValueError(f"attend.heads: ({layer}, {head}) is not a head of a {layers}-layer "
                                 f"decoder with {heads} heads")

    def loss(self, model, batch: dict) -> torch.Tensor:
        """The language-model loss plus `weight` x the attention loss (the model runs eager attention for it)."""
        inputs = {k: v for k, v in batch.items() if k != "asked"}
        out = model(**inputs, output_attentions=True)
        extra = attention_loss(out.attentions, batch, model.config.image_token_id, self.heads)
        return out.loss if extra is None else out.loss + self.weight * extra
