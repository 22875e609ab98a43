"""Compression in the engine: quantized decoders, visual-token pruning (with and without speculation),
self-speculation (the job's side: tests/pipeline/test_compression_job.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from engine.agreement import token_agreement
from engine.config import Compression, EngineConfig
from engine.engine import SpecEngine
from engine.request import SamplingParams
from engine.visual_tokens import VisualTokenPruner, _max_min_subset
from kernels.quant import QuantLinear
from engine.processor import load_processor
from training.heldout import heldout_requests

ROOT = Path(__file__).resolve().parents[2]
TARGET, DRAFTER = str(ROOT / "models/target"), str(ROOT / "models/drafter-vlm")
PARAMS = SamplingParams(max_new_tokens=32)


@pytest.fixture(scope="module")
def rows():
    requests = heldout_requests(load_processor(TARGET), 24)
    plain = SpecEngine(EngineConfig(TARGET, None, dtype="float32", max_batch_size=12))
    return requests, plain.generate(requests, PARAMS), plain


@pytest.mark.parametrize("weights,min_agreement,max_bytes", [("int8", 0.99, 0.55), ("int4", 0.97, 0.35)])
def test_quantized_target_agrees_with_the_dense_one_and_is_smaller(rows, weights, min_agreement, max_bytes):
    requests, reference, plain = rows
    engine = SpecEngine(EngineConfig(TARGET, None, dtype="float32", max_batch_size=12, compression=Compression(weights)))
    dec = engine.target.decoder
    assert all(isinstance(p[n], QuantLinear) for p in dec.layers for n in dec.LINEARS)
    assert dec.quantized["linear_bytes"] < max_bytes * plain.target.decoder.linear_bytes()
    assert engine.target.weight_bytes() < plain.target.weight_bytes()
    out = engine.generate(requests, PARAMS)
    agreed = token_agreement(engine.target, requests, [r.token_ids for r in reference])
    assert sum(agreed) / sum(len(r.token_ids) for r in reference) >= min_agreement
    own = token_agreement(plain.target, requests, [r.token_ids for r in reference])
    assert own == [len(r.token_ids) for r in reference]
    assert sum(a.text == b.text for a, b in zip(out, reference)) >= 0.75 * len(reference)


def test_pruned_prompts_keep_their_original_positions(tiny_model):
    """A LLaVA (1-D positions, 64 image tokens); the M-RoPE case is tests/engine/test_families.py's."""
    requests = heldout_requests(load_processor(str(tiny_model)), 3)
    prompts, arrays = [r.input_ids for r in requests[:3]], [r.model_inputs for r in requests[:3]]
    full = SpecEngine(EngineConfig(str(tiny_model), None, dtype="float32")).target.embed_prompts(prompts, arrays)
    for method in ("attention", "diversity"):
        ck = SpecEngine(EngineConfig(str(tiny_model), None, dtype="float32",
                        compression=Compression(visual_keep=0.5, visual_method=method))).target
        pe = ck.embed_prompts(prompts, arrays)
        assert pe.lengths == [len(p) - 32 for p in prompts] and pe.offsets == [32] * 3  # 64 image tokens, half kept
        for i, p in enumerate(prompts):
            pos = pe.positions[i, :pe.lengths[i]]
            assert torch.all(pos[1:] > pos[:-1])  # original order
            kept_ids = torch.tensor(p)[pos]
            assert int((kept_ids == ck.image_token_id).sum()) == 32
            assert kept_ids[kept_ids != ck.image_token_id].tolist() == [t for t in p if t != ck.image_token_id]
            assert torch.equal(pe.embeds[i, :pe.lengths[i]], full.embeds[i, pos])  # kept tokens are unchanged


def test_attention_ranking_is_the_cls_attention_of_the_encoder():
    """The pruner's scores equal the [CLS] row of the attention weights the CLIP encoder itself reports."""
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=24, patch_size=6)
    tower = CLIPVisionModel(cfg).eval()
    tower.config._attn_implementation = "eager"

    class Model:
        vision_tower = tower

    class Config:
        vision_feature_layer, model_type = -1, "llava"

    pruner = VisualTokenPruner(Model, Config, keep=0.25, method="attention")
    pixels = torch.randn(2, 3, 24, 24)
    handle = pruner.hook()
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_attentions=True)
    handle.remove()
    cls_attention = out.attentions[-1].mean(1)[:, 0, 1:]  # [images, 16 patches]
    kept = pruner.select(torch.randn(2, 16, 8))
    assert torch.equal(kept, cls_attention.topk(4, dim=-1).indices.sort(-1).values)


def test_diversity_keeps_one_token_of_every_cluster():
    centres = torch.eye(4) * 10
    tokens = torch.cat([centres[i] + 0.01 * torch.randn(5, 4) for i in range(4)])[torch.randperm(20)]
    kept = _max_min_subset(tokens[None], 4)[0]
    clusters = {int(tokens[j].argmax()) for j in kept}
    assert clusters == {0, 1, 2, 3}


def test_pruning_works_with_speculation_and_self_speculation_is_lossless(rows):
    requests, reference, _ = rows
    pruned = Compression(visual_keep=0.5, visual_method="diversity")
    alone = SpecEngine(EngineConfig(TARGET, None, dtype="float32", max_batch_size=12, compression=pruned))
    drafted = SpecEngine(EngineConfig(TARGET, DRAFTER, dtype="float32", max_batch_size=12, compression=pruned, num_draft_tokens=4))
    expected = alone.generate(requests, PARAMS)
    got = drafted.generate(requests, PARAMS)
    assert [r.text for r in got] == [r.text for r in expected]
    assert drafted.stats.accepted > 0.5 * drafted.stats.drafted
    assert alone.stats.prefill_s > 0 and sum(r.num_output_tokens for r in expected) > 0

    selfspec = SpecEngine(EngineConfig(TARGET, "self-int8", dtype="float32", max_batch_size=12, num_draft_tokens=4))
    out = selfspec.generate(requests, PARAMS)
    assert [r.text for r in out] == [r.text for r in reference]  # the dense target verifies: lossless
    assert selfspec.stats.accepted > 0.9 * selfspec.stats.drafted  # the int8 copy of itself rarely disagrees
    drafter_dec = selfspec.drafter.dec
    assert drafter_dec is not selfspec.target.decoder and drafter_dec.embed_weight is selfspec.target.decoder.embed_weight


def test_loading_is_safetensors_only(tmp_path, tiny_model):
    """A checkpoint whose weights are a pickle (pytorch_model.bin) is refused: pickles can run code on load."""
    import shutil

    from engine.model import LoadedModel

    for f in tiny_model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    from safetensors.torch import load_file

    torch.save(load_file(tiny_model / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        LoadedModel(str(tmp_path), "cpu", torch.float32)
    LoadedModel(str(tiny_model), "cpu", torch.float32)  # the same model as safetensors loads


@torch.inference_mode()
def test_attention_ranking_on_a_patch_merging_tower_reads_the_towers_own_last_block(tmp_path):
    """Qwen2.5-VL's tower (window attention, 2x2 patches per token): a token's score is the attention its four
    patches receive in the last (whole-image) block, exactly as the tower computes it (recorded from its own
    eager attention), put back in the tokens' row-major order; the ranking keeps the top tokens."""
    import sys

    from engine.visual_tokens import VisualTokenPruner
    from scenes import corpus
    from training.modelpair import build_qwen_processor, build_qwen_vlm
    from training.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(num_texts=200)
    spec = {"vision": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
            "text": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": 128}}
    model = build_qwen_vlm(spec, tok, patch_size=8).eval()
    tower = model.model.visual
    tower.config._attn_implementation = "eager"
    processor = build_qwen_processor(tok, patch_size=8)
    images = [corpus.sample(3000, i).image for i in range(3)]
    enc = processor.image_processor(images, return_tensors="pt")
    module = sys.modules[type(tower.blocks[-1].attn).__module__]
    recorded, eager = [], module.eager_attention_forward

    def recording(mod, *args, **kwargs):
        out, weights = eager(mod, *args, **kwargs)
        if mod is tower.blocks[-1].attn:
            recorded.append(weights)
        return out, weights

    pruner = VisualTokenPruner(model, model.config, keep=0.25, method="attention")
    handle = pruner.hook()
    module.eager_attention_forward = recording
    try:
        merged = tower(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output.view(3, 36, -1)
    finally:
        module.eager_attention_forward = eager
        handle.remove()
    scores = torch.stack(pruner._merged_scores())
    from transformers.vision_utils import get_vision_window_index

    window, _ = get_vision_window_index(enc["image_grid_thw"], 2, tower.window_size, tower.patch_size)
    received = torch.cat([w[0].float().mean((0, 1)) for w in recorded])  # per patch, window order
    want = received.view(-1, 4).sum(1)[torch.argsort(window)].view(3, 36)
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(scores[0], scores[1])  # the scores depend on the image
    kept = pruner.select(merged)
    assert kept.shape == (3, 9) and torch.equal(kept, want.topk(9, -1).indices.sort(-1).values)
