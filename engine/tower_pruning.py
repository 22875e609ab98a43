"""Visual-token pruning inside a patch-merging vision tower (Qwen2-VL, Qwen2.5-VL): from block `layer` on, the
tower runs on the kept tokens' patches only, so pruning saves the tower's work as well as the decoder's.

Pruning after the merger (engine/visual_tokens.py) leaves the tower to encode every patch, and in a small VLM
the tower is half of prefill. Here the tower's own forward runs with four hooks:
- on the tower: the image grid, hence each image's tokens in the tower's (window) order and its windows;
- before block `layer`: each image's tokens (an m x m group of patches each, contiguous) are ranked on the
  hidden states there (layer 0: the patch embeddings), the kept ones' patches go on, and the block is handed
  their rotary embeddings and the attention segments (whole image, or windows) recounted over them;
- before every later block: the same segments and rotary embeddings;
- after the merger: the kept tokens' features are scattered back into a full-size output (zeros where pruned),
  so that the model's own code (window order undone, placeholder scatter, M-RoPE positions) runs unchanged, and
  the engine drops the pruned placeholders as it drops any pruned token: kept tokens keep their positions.

A model sees a different tower output than without pruning (its attention saw fewer patches), so it is for
a model trained with it (training/token_dropout.py drops tokens the same way); at keep 1.0 nothing changes.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

# features [images, m, d], n, places [images, m, 3] (each token's frame, row, column on the image's token grid,
# over the grid's longer side) -> kept indices [images, n]
Ranking = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


class TowerPruning:
    def __init__(self, tower, keep: float, layer: int, rank: Ranking):
        if not 0 <= layer < len(tower.blocks):
            raise ValueError(f"compression.visual_tokens.tower_layer: the vision tower has blocks 0..{len(tower.blocks) - 1}, "
                             f"not {layer}")
        self.tower, self.keep, self.layer, self.rank = tower, keep, layer, rank
        self.unit = tower.spatial_merge_size ** 2
        full = getattr(tower, "fullatt_block_indexes", None)
        self.full_blocks = set(range(len(tower.blocks)) if full is None else full)  # Qwen2-VL: no windows
        self.kept: list[torch.Tensor] | None = None  # per image: kept token indices, row-major, sorted
        self._state: dict = {}

    def hook(self):
        """Install the hooks for one forward of the tower; returns a handle whose remove() takes them out."""
        handles = [self.tower.register_forward_pre_hook(self._start, with_kwargs=True),
                   self.tower.merger.register_forward_hook(self._scatter)]
        for i, block in enumerate(self.tower.blocks[self.layer:], self.layer):
            handles.append(block.register_forward_pre_hook(self._block_hook(i), with_kwargs=True))
        return Handles(handles)

    def _start(self, _module, args, kwargs):
        self.start(kwargs.get("grid_thw", args[1] if len(args) > 1 else None))

    def start(self, grid: torch.Tensor) -> None:
        """A new forward of the tower over images of `grid` [images, 3]."""
        sizes = [int(t * h * w) // self.unit for t, h, w in grid.tolist()]  # tokens per image
        if hasattr(self.tower, "window_size"):
            from transformers.vision_utils import get_vision_window_index

            order, cu = get_vision_window_index(grid, self.tower.spatial_merge_size, self.tower.window_size,
                                                self.tower.patch_size)
            window_of = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu // self.unit).diff().cpu())
        else:
            order, window_of = torch.arange(sum(sizes)), None
        self.kept = None
        self._state = {"sizes": sizes, "order": order.to(grid.device), "window_of": window_of,
                       "places": self._places(grid, sizes, order)}

    def _places(self, grid: torch.Tensor, sizes: list[int], order: torch.Tensor) -> list[torch.Tensor]:
        """Per image, each token's (frame, row, column) in the tower's order, over the token grid's longer side."""
        m = self.tower.spatial_merge_size
        places, start = [], 0
        for (t, h, w), size in zip(grid.tolist(), sizes):
            h, w = h // m, w // m
            r = order[start:start + size].cpu() - start  # row-major index of each token, in the tower's order
            frame, cell = r // (h * w), r % (h * w)
            places.append(torch.stack([frame, cell // w, cell % w], -1).float() / max(h - 1, w - 1, 1))
            start += size
        return places

    def select(self, hidden: torch.Tensor) -> "Kept":
        """Rank each image's tokens on `hidden` [patches, d] (window order) and work out what the blocks run on:
        the kept patches (indices into `hidden`) and the whole-image and window segments (cu_seqlens) over them."""
        s = self._state
        tokens = hidden.detach().reshape(-1, self.unit * hidden.shape[-1])  # one row per token, its patches side by side
        starts = torch.tensor([0, *s["sizes"]]).cumsum(0).tolist()
        by_size: dict[int, list[int]] = {}
        for i, m in enumerate(s["sizes"]):
            by_size.setdefault(m, []).append(i)
        chosen: list = [None] * len(s["sizes"])  # per image: kept token indices in window order, from its start
        for m, images in by_size.items():  # images of one size are ranked together
            n = max(1, round(self.keep * m))
            feats = torch.stack([tokens[starts[i]:starts[i] + m] for i in images])
            places = torch.stack([s["places"][i] for i in images]).to(hidden.device)
            picked = self.rank(feats, n, places) if n < m else torch.arange(m, device=hidden.device).expand(len(images), m)
            for i, p in zip(images, picked.sort(-1).values):
                chosen[i] = p + starts[i]
        counts = [len(c) for c in chosen]
        kept_tokens = torch.cat(chosen)  # window-order token indices, ascending
        s["tokens"] = kept_tokens
        s["patches"] = (kept_tokens[:, None] * self.unit + torch.arange(self.unit, device=hidden.device)).flatten()
        s["full"] = self._segments(counts)
        if s["window_of"] is not None:  # kept tokens per window, windows left empty dropped
            per_window = torch.bincount(s["window_of"][kept_tokens.cpu()], minlength=int(s["window_of"][-1]) + 1)
            s["window"] = self._segments(per_window[per_window > 0].tolist())
        else:
            s["window"] = s["full"]
        # per image, the kept tokens in row-major order (what the merger's output is put back into)
        order = s["order"][kept_tokens]
        self.kept = [(o - starts[i]).sort().values for i, o in enumerate(order.split(counts))]
        return Kept(s["patches"], s["full"][0], s["window"][0])

    def _segments(self, counts: list[int]) -> tuple[torch.Tensor, int]:
        lengths = torch.tensor(counts, dtype=torch.int32) * self.unit
        cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return cu.to(self._state["order"].device), int(lengths.max())

    def _block_hook(self, index: int):
        def pre(_module, args, kwargs):
            s = self._state
            hidden = kwargs.pop("hidden_states", None) if not args else args[0]
            if index == self.layer:
                self.select(hidden)
                hidden = hidden[s["patches"]]
                s["rotary"] = tuple(x[s["patches"]] for x in kwargs["position_embeddings"])
            cu, longest = s["full"] if index in self.full_blocks else s["window"]
            kwargs = dict(kwargs, cu_seqlens=cu, max_seqlen=longest, position_embeddings=s["rotary"])
            return (hidden, *args[1:]), kwargs
        return pre

    def _scatter(self, _module, _args, out: torch.Tensor) -> torch.Tensor:
        return self.scatter(out)

    def scatter(self, out: torch.Tensor) -> torch.Tensor:
        """The merger's output over the kept tokens -> every token's (window order), zeros where pruned."""
        tokens = self._state["tokens"]
        full = out.new_zeros(sum(self._state["sizes"]), out.shape[-1])
        return full.index_copy(0, tokens, out)


class Kept(NamedTuple):
    patches: torch.Tensor  # the kept patches, indices into the tower's sequence (window order)
    full: torch.Tensor  # cu_seqlens of the whole-image segments over the kept patches
    window: torch.Tensor  # cu_seqlens of the windows over them


class Handles:
    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
