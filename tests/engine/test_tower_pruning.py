"""Visual-token pruning inside a patch-merging vision tower (engine/tower_pruning.py), on a tiny Qwen2.5-VL tower
with several attention windows per image: at keep 1.0 it is the tower's own output; below, the blocks from the
pruning layer on run on the kept tokens' patches alone, within their own windows and images."""
from __future__ import annotations

import pytest
import torch

from engine.tower_pruning import TowerPruning
from scenes import corpus
from training.modelpair import build_qwen_processor, build_qwen_vlm
from training.tokenizer import train_tokenizer

SPEC = {"vision": {"depth": 3, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
        "text": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128}}


@pytest.fixture(scope="module")
def tower_and_pixels():
    torch.manual_seed(0)
    tok = train_tokenizer(num_texts=200)
    model = build_qwen_vlm(SPEC, tok, patch_size=8).eval()  # windows of 4x4 tokens: four per 6x6-token image
    enc = build_qwen_processor(tok, patch_size=8).image_processor(
        [corpus.sample(3100, i).image for i in range(3)], return_tensors="pt")
    return model.model.visual, enc["pixel_values"], enc["image_grid_thw"]


def first_tokens(feats: torch.Tensor, n: int, places: torch.Tensor) -> torch.Tensor:
    """A ranking that ignores the features: each image's first n tokens in the tower's order."""
    return torch.arange(n).expand(feats.shape[0], n)


def run(tower, pixels, grid, pruning: TowerPruning | None = None) -> torch.Tensor:
    handle = pruning.hook() if pruning else None
    try:
        return tower(pixels, grid_thw=grid).pooler_output.view(len(grid), 36, -1)
    finally:
        if handle:
            handle.remove()


def patches_of(tokens: list[int], image: int) -> list[int]:
    """Rows of pixel_values (4 patches per token, tokens row-major, 36 per image) of an image's tokens."""
    return [image * 144 + t * 4 + j for t in tokens for j in range(4)]


@torch.inference_mode()
@pytest.mark.parametrize("layer", [0, 2])
def test_at_keep_1_the_tower_output_is_its_own(tower_and_pixels, layer):
    tower, pixels, grid = tower_and_pixels
    want = run(tower, pixels, grid)
    pruning = TowerPruning(tower, 1.0, layer, first_tokens)
    torch.testing.assert_close(run(tower, pixels, grid, pruning), want, rtol=0, atol=0)
    assert [k.tolist() for k in pruning.kept] == [list(range(36))] * 3


@torch.inference_mode()
def test_pruned_at_the_first_block_the_tower_never_sees_the_pruned_patches(tower_and_pixels):
    """Kept tokens' features are the same whatever the pruned patches hold, and change with a kept patch; pruned
    tokens come out as zeros; `kept` says which tokens (row-major) were kept, 18 of 36 per image."""
    tower, pixels, grid = tower_and_pixels
    pruning = TowerPruning(tower, 0.5, 0, first_tokens)
    out = run(tower, pixels, grid, pruning)
    kept = [k.tolist() for k in pruning.kept]
    assert all(len(k) == 18 for k in kept)
    pruned = [sorted(set(range(36)) - set(k)) for k in kept]
    assert all(out[i, pruned[i]].abs().sum() == 0 for i in range(3))
    assert all(out[i, kept[i]].abs().sum(-1).min() > 0 for i in range(3))
    noisy = pixels.clone()
    noisy[patches_of(pruned[1], 1)] = torch.randn(len(pruned[1]) * 4, pixels.shape[1])
    torch.testing.assert_close(run(tower, noisy, grid, pruning), out, rtol=0, atol=0)
    changed = pixels.clone()
    changed[patches_of(kept[1][:1], 1)] += 1.0
    again = run(tower, changed, grid, pruning)
    assert not torch.allclose(again[1, kept[1]], out[1, kept[1]])
    torch.testing.assert_close(again[[0, 2]], out[[0, 2]])  # each image attends over its own tokens only


@torch.inference_mode()
def test_windowed_blocks_attend_within_their_windows_over_the_kept_tokens(tower_and_pixels):
    """With every block windowed, a kept token's change reaches the kept tokens of its own window only; with the
    last block over the whole image, it reaches the others too (the segments are recounted per window)."""
    tower, pixels, grid = tower_and_pixels
    from transformers.vision_utils import get_vision_window_index

    order, cu = get_vision_window_index(grid[:1], 2, tower.window_size, tower.patch_size)
    window_of = torch.zeros(36, dtype=torch.long)
    for w, (a, z) in enumerate(zip((cu // 4)[:-1].tolist(), (cu // 4)[1:].tolist())):
        window_of[order[a:z]] = w
    assert len(set(window_of.tolist())) == 4
    full = tower.fullatt_block_indexes
    try:
        tower.fullatt_block_indexes = []
        pruning = TowerPruning(tower, 0.5, 0, first_tokens)
        out = run(tower, pixels, grid, pruning)
        kept = pruning.kept[0]
        assert len(set(window_of[kept].tolist())) > 1  # the kept tokens span several windows
        token = int(kept[0])
        changed = pixels.clone()
        changed[patches_of([token], 0)] += 1.0
        moved = (run(tower, changed, grid, pruning)[0] - out[0]).abs().sum(-1) > 0
        assert moved[token] and set(moved.nonzero().squeeze(1).tolist()) <= set(
            (window_of == window_of[token]).nonzero().squeeze(1).tolist())
    finally:
        tower.fullatt_block_indexes = full
    pruning = TowerPruning(tower, 0.5, 0, first_tokens)
    out = run(tower, pixels, grid, pruning)
    moved = (run(tower, changed, grid, pruning)[0] - out[0]).abs().sum(-1) > 0
    assert (window_of[moved.nonzero().squeeze(1)] != window_of[token]).any()


@torch.inference_mode()
def test_the_ranking_is_told_each_tokens_place_on_the_image(tower_and_pixels):
    """The tower holds tokens in window order; the places it hands the ranking are their own rows and columns:
    keeping the tokens first in row-major order by their places keeps each image's top row."""
    tower, pixels, grid = tower_and_pixels
    seen = []

    def top_rows(feats, n, places):
        seen.append(places)
        return (places[..., 1] * 6 + places[..., 2]).argsort(-1)[:, :n]

    pruning = TowerPruning(tower, 6 / 36, 1, top_rows)
    run(tower, pixels, grid, pruning)
    assert [k.tolist() for k in pruning.kept] == [list(range(6))] * 3
    places = seen[0][0]  # first image, [36, 3]: frame, row, column over the grid's longer side (6 tokens)
    assert places[:, 0].eq(0).all() and places.min() == 0 and places.max() == 1
    rows_cols = {(round(r * 5), round(c * 5)) for _, r, c in places.tolist()}
    assert rows_cols == {(r, c) for r in range(6) for c in range(6)}
    assert (places[3:5, 1:] * 5).round().tolist() == [[0, 3], [1, 0]]  # window order (4x4 windows), not row-major


def test_spread_covers_a_uniform_image_where_diversity_keeps_one_corner():
    """Sixteen identical tokens on a 4x4 grid: diversity has nothing to tell them apart and keeps the first four
    (the top row); spread, which adds the tokens' distance on the grid, keeps the four corners."""
    from engine.visual_tokens import _max_min_subset

    feats = torch.ones(1, 16, 8)
    r = torch.arange(16)
    places = torch.stack([torch.zeros(16), r // 4, r % 4], -1)[None] / 3
    assert _max_min_subset(feats, 4).sort(-1).values.tolist() == [[0, 1, 2, 3]]
    assert _max_min_subset(feats, 4, places).sort(-1).values.tolist() == [[0, 3, 12, 15]]


def test_a_block_the_tower_lacks_is_refused(tower_and_pixels):
    tower, _, _ = tower_and_pixels
    with pytest.raises(ValueError, match="tower_layer: the vision tower has blocks 0..2, not 3"):
        TowerPruning(tower, 0.5, 3, first_tokens)


def test_what_cannot_prune_inside_the_tower_is_refused_at_load(tower_and_pixels):
    from types import SimpleNamespace

    from engine.visual_tokens import VisualTokenPruner

    tower, _, _ = tower_and_pixels
    qwen = SimpleNamespace(model=SimpleNamespace(visual=tower))
    config = SimpleNamespace(model_type="qwen2_5_vl", vision_feature_layer=-1)
    assert VisualTokenPruner(qwen, config, 0.5, "diversity", tower_layer=1).per_image
    assert VisualTokenPruner(qwen, config, 0.5, "spread", tower_layer=1).per_image
    with pytest.raises(ValueError, match="^compression.visual_tokens.method: pruning inside the tower ranks by div"):
        VisualTokenPruner(qwen, config, 0.5, "attention", tower_layer=1)
    with pytest.raises(ValueError, match="^compression.visual_tokens.method: spread ranks tokens inside the vision "):
        VisualTokenPruner(qwen, config, 0.5, "spread")
    with pytest.raises(ValueError, match="^compression.visual_tokens.merge: "):
        VisualTokenPruner(qwen, config, 0.5, "diversity", merge=True, tower_layer=1)
    llava = SimpleNamespace(model=SimpleNamespace(vision_tower=torch.nn.Module()))
    with pytest.raises(ValueError, match="needs a patch-merging vision tower .* which llava does not have"):
        VisualTokenPruner(llava, SimpleNamespace(model_type="llava"), 0.5, "diversity", tower_layer=0)
