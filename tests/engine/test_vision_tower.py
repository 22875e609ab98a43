"""The engine's own Qwen2.5-VL tower forward (engine/vision_tower.py) against the tower module's, on a tiny tower with
windows of 4x4 tokens (four windows of 16, 8, 8 and 4 tokens on a 6x6-token image, so segments of several lengths
are batched) and images of two sizes in one call: the same features, with and without pruning inside the tower."""
from __future__ import annotations

import pytest
import torch

from engine.tower_pruning import TowerPruning
from engine.vision_tower import LeanTower, supports
from tests.engine.test_tower_pruning import SPEC, first_tokens
from scenes import corpus
from training.modelpair import build_qwen_processor, build_qwen_vlm
from training.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tower_and_pixels():
    torch.manual_seed(0)
    tok = train_tokenizer(num_texts=200)
    model = build_qwen_vlm(SPEC, tok, patch_size=8).eval()
    images = [corpus.sample(3100, i).image for i in range(3)] + [corpus.sample(3100, 3).image.resize((160, 96))]
    processor = build_qwen_processor(tok, patch_size=8).image_processor
    encoded = [processor([im], return_tensors="pt") for im in images]
    pixels = torch.cat([e["pixel_values"] for e in encoded])
    grid = torch.cat([e["image_grid_thw"] for e in encoded])
    return model.model.visual, pixels, grid


def hf(tower, pixels, grid, pruning: TowerPruning | None = None) -> torch.Tensor:
    handle = pruning.hook() if pruning else None
    try:
        return tower(pixels, grid_thw=grid).pooler_output
    finally:
        if handle:
            handle.remove()


@torch.inference_mode()
@pytest.mark.parametrize("chunk", [2048, 300])  # one chunk; two images at most a chunk (three chunks)
def test_the_lean_tower_gives_the_towers_own_features(tower_and_pixels, chunk, monkeypatch):
    monkeypatch.setattr("engine.vision_tower.CHUNK_PATCHES", chunk)
    tower, pixels, grid = tower_and_pixels
    assert supports(tower) and grid[:, 1:].unique(dim=0).shape[0] == 2  # two image sizes in the call
    want = hf(tower, pixels, grid)
    got = LeanTower(tower)(pixels, grid)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    other = pixels.clone()
    other[:144] = torch.randn(144, pixels.shape[1])  # the first image's patches
    moved = (LeanTower(tower)(other, grid) - got).abs().sum(-1) > 0
    assert moved[:36].all() and not moved[36:].any()  # each image attends over its own patches only


@torch.inference_mode()
@pytest.mark.parametrize("layer,chunk", [(0, 2048), (2, 2048), (2, 300)])
def test_the_lean_tower_prunes_as_the_hooked_tower_does(tower_and_pixels, layer, chunk, monkeypatch):
    monkeypatch.setattr("engine.vision_tower.CHUNK_PATCHES", chunk)
    tower, pixels, grid = tower_and_pixels
    hooked = TowerPruning(tower, 0.5, layer, first_tokens)
    want = hf(tower, pixels, grid, hooked)
    lean = TowerPruning(tower, 0.5, layer, first_tokens)
    got = LeanTower(tower)(pixels, grid, lean)
    assert [k.tolist() for k in lean.kept] == [k.tolist() for k in hooked.kept]
    assert (got.abs().sum(-1) == 0).sum() == (want.abs().sum(-1) == 0).sum() > 0  # pruned tokens: zeros
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_the_engine_embeds_prompts_through_it(tower_and_pixels):
    """The shipped target: LoadedModel holds the lean tower, and its prompt embeddings are those of HF's tower."""
    from engine.model import LoadedModel
    from engine.processor import encode, load_processor
    from tests.conftest import ROOT

    model = LoadedModel(str(ROOT / "models/target"), "cpu", torch.float32)
    assert isinstance(model.lean_tower, LeanTower)
    processor = load_processor(str(ROOT / "models/target"))
    rows = [encode(processor, s.question, s.image) for s in (corpus.sample(3200, i) for i in range(3))]
    lean = model.embed_prompts([r[0] for r in rows], [r[1] for r in rows])
    tower, model.lean_tower = model.lean_tower, None
    own = model.embed_prompts([r[0] for r in rows], [r[1] for r in rows])
    model.lean_tower = tower
    torch.testing.assert_close(lean.embeds, own.embeds, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(lean.embeds[0], lean.embeds[1])
