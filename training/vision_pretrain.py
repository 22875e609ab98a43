"""Pretraining the vision tower on dense scene labels: our stand-in for the pretrained CLIP a real VLM starts from.

From-scratch VLM training on this corpus stalls at the loss of an image-blind model: the decoder learns the
answer grammar first and the gradient reaching a random vision tower is too weak to bootstrap it. So, as
LLaVA starts from a pretrained CLIP, the tower is first trained alone to predict, from its patch features,
what every grid cell holds (colour, shape, size) and which word is written: a dense, fast-learning signal.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from training import corpus
from training.optim import fit

COLORS = [None, *sorted(corpus.COLORS)]
SHAPES = [None, *corpus.SHAPES]
SIZES = [None, *sorted(corpus.SIZES)]
WORDS = [None, *corpus.WORDS]
HEADS = {"color": len(COLORS), "shape": len(SHAPES), "size": len(SIZES)}


def scene_labels(scene: corpus.Scene) -> dict[str, torch.Tensor]:
    cells = {s.cell: s for s in scene.shapes}
    out = {name: torch.zeros(9, dtype=torch.long) for name in HEADS}
    for cell, s in cells.items():
        out["color"][cell] = COLORS.index(s.color)
        out["shape"][cell] = SHAPES.index(s.kind)
        out["size"][cell] = SIZES.index(s.size)
    out["word"] = torch.tensor(WORDS.index(scene.word))
    return out


def patch_cells(image_size: int, patch_size: int) -> torch.Tensor:
    """For each patch (row-major), the grid cell its centre falls in."""
    side = image_size // patch_size
    centres = (torch.arange(side) * patch_size + patch_size // 2) * 3 // image_size
    return (centres[:, None] * 3 + centres[None, :]).flatten()


class SceneProbe(nn.Module):
    """Linear read-outs: every patch token says what its own cell holds; the mean token says the word.

    Per-patch labels make each token carry its cell's content, which is what the decoder's attention
    needs: it can find the token of "the circle" and read its colour from the same token.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.cells = nn.Linear(hidden, sum(HEADS.values()))
        self.word = nn.Linear(hidden, len(WORDS))

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cells(patches), self.word(patches.mean(1))


def pretrain_vision(vision_tower, image_processor, steps: int, batch_size: int, lr: float, seed: int,
                    log_every: int = 50, device: str = "cpu") -> list[float]:
    rng = random.Random(seed)
    config = vision_tower.config
    probe = SceneProbe(config.hidden_size).to(device)
    vision_tower.to(device)
    cell_of_patch = patch_cells(config.image_size, config.patch_size)
    params = list(vision_tower.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    ce = nn.CrossEntropyLoss()
    vision_tower.train()

    def loss_fn() -> torch.Tensor:
        scenes = [corpus.make_scene(rng) for _ in range(batch_size)]
        pixels = torch.from_numpy(np.stack(image_processor([corpus.render(s) for s in scenes])["pixel_values"]))
        labels = [{k: v.to(device) for k, v in scene_labels(s).items()} for s in scenes]
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            patches = vision_tower(pixel_values=pixels.to(device)).last_hidden_state[:, 1:]  # drop [CLS], as the VLM does
            cells, word = probe(patches)
        loss = ce(word.float(), torch.stack([lab["word"] for lab in labels]))
        start = 0
        for name, n in HEADS.items():
            target = torch.stack([lab[name] for lab in labels])[:, cell_of_patch.to(device)]  # (batch, patches)
            loss = loss + ce(cells[..., start:start + n].float().reshape(-1, n), target.reshape(-1))
            start += n
        return loss

    losses = fit(params, loss_fn, opt, sched, steps, "vision", log_every)
    vision_tower.eval()
    return losses
