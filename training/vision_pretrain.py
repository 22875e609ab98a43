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

from scenes import corpus
from training.optim import autocast, fit

COLORS = [None, *sorted(corpus.COLORS)]
SHAPES = [None, *corpus.SHAPES]
SIZES = [None, *sorted(corpus.SIZES)]
WORDS = [None, *corpus.WORDS]
HEADS = {"color": len(COLORS), "shape": len(SHAPES), "size": len(SIZES)}
CELL_HEAD = {"cell": 9}  # cell_head: every token also says which grid cell it lies in


def scene_labels(scene: corpus.Scene) -> dict[str, torch.Tensor]:
    cells = {s.cell: s for s in scene.shapes}
    out = {name: torch.zeros(9, dtype=torch.long) for name in HEADS}
    for cell, s in cells.items():
        out["color"][cell] = COLORS.index(s.color)
        out["shape"][cell] = SHAPES.index(s.kind)
        out["size"][cell] = SIZES.index(s.size)
    out["word"] = torch.tensor(WORDS.index(scene.word))
    out["cell"] = torch.arange(9)
    return out


def patch_cells(image_size: int, patch_size: int) -> torch.Tensor:
    """For each patch (row-major), the grid cell its centre falls in."""
    side = image_size // patch_size
    centres = (torch.arange(side) * patch_size + patch_size // 2) * 3 // image_size
    return (centres[:, None] * 3 + centres[None, :]).flatten()


class SceneProbe(nn.Module):
    """Linear read-outs: every patch token says what its own cell holds, and which word is written.

    Per-patch labels make each token carry its cell's content, which is what the decoder's attention
    needs: it can find the token of "the circle" and read its colour from the same token. The word on every
    token (not only their mean) keeps it readable when visual-token pruning drops most of them. With
    `cell_head`, every token also names its own cell: a tower with only relative (rotary) positions, as
    Qwen2.5-VL's, then writes where a shape is into the shape's own tokens, where a small decoder reads it.
    """

    def __init__(self, hidden: int, heads: dict[str, int] = HEADS):
        super().__init__()
        self.cells = nn.Linear(hidden, sum(heads.values()))
        self.word = nn.Linear(hidden, len(WORDS))

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cells(patches), self.word(patches)


def tower_features(vision_tower, image_processor, images, device: str) -> torch.Tensor:
    """[images, tokens, hidden]: the tower's per-token features, as its VLM's decoder will see them. CLIP: the
    patch tokens without [CLS]. Qwen2.5-VL: the merger's output, one token per 2x2 patches (row-major)."""
    enc = image_processor(images)
    pixels = torch.from_numpy(np.stack(enc["pixel_values"])).to(device)
    if "image_grid_thw" not in enc:
        return vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
    grid = torch.tensor(np.asarray(enc["image_grid_thw"]), device=device)
    merged = vision_tower(pixels, grid_thw=grid).pooler_output
    return merged.view(len(images), -1, merged.shape[-1])


def tower_grid(vision_tower) -> tuple[int, int]:
    """(image size, pixels per feature token) of a tower."""
    config = vision_tower.config
    if hasattr(config, "spatial_merge_size"):  # Qwen2.5-VL: the corpus's image size, merged patches
        return corpus.IMAGE_SIZE, config.patch_size * config.spatial_merge_size
    return config.image_size, config.patch_size


def pretrain_vision(vision_tower, image_processor, steps: int, batch_size: int, lr: float, seed: int,
                    log_every: int = 50, device: str = "cpu", cell_head: bool = False,
                    bf16: bool | None = None) -> list[float]:
    rng = random.Random(seed)
    config = vision_tower.config
    heads = HEADS | CELL_HEAD if cell_head else HEADS
    probe = SceneProbe(getattr(config, "out_hidden_size", config.hidden_size), heads).to(device)
    vision_tower.to(device)
    cell_of_patch = patch_cells(*tower_grid(vision_tower))
    params = list(vision_tower.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    ce = nn.CrossEntropyLoss()
    vision_tower.train()

    def loss_fn() -> torch.Tensor:
        scenes = [corpus.make_scene(rng) for _ in range(batch_size)]
        labels = [{k: v.to(device) for k, v in scene_labels(s).items()} for s in scenes]
        with autocast(device, bf16):
            patches = tower_features(vision_tower, image_processor, [corpus.render(s) for s in scenes], device)
            cells, word = probe(patches)
        words = torch.stack([lab["word"] for lab in labels])[:, None].expand(word.shape[:2])  # (batch, patches)
        loss = ce(word.float().reshape(-1, word.shape[-1]), words.reshape(-1))
        start = 0
        for name, n in heads.items():
            target = torch.stack([lab[name] for lab in labels])[:, cell_of_patch.to(device)]  # (batch, patches)
            loss = loss + ce(cells[..., start:start + n].float().reshape(-1, n), target.reshape(-1))
            start += n
        return loss

    losses = fit(params, loss_fn, opt, sched, steps, "vision", log_every)
    vision_tower.eval()
    return losses
