"""Depth growth (training/grow.py): the grown decoder computes exactly what the shallow one did, and every new
layer can learn."""
from __future__ import annotations

import pytest
import torch

from training.grow import grow, layer_map
from training.modelpair import build_qwen_processor, build_qwen_vlm
from training.tokenizer import train_tokenizer
from training.train import Batcher, ground_truth_batches, train_model


def spec(layers: int) -> dict:
    return {"vision": {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
            "text": {"hidden_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 128}}


def test_layer_map_spreads_the_trained_layers_and_refuses_an_uneven_depth():
    assert layer_map(2, 8) == {0: 0, 4: 1}
    assert layer_map(1, 3) == {0: 0}
    with pytest.raises(ValueError, match="shallow_layers"):
        layer_map(3, 8)


def test_the_grown_decoder_gives_the_shallow_ones_logits_and_then_learns():
    torch.manual_seed(0)
    tok = train_tokenizer(num_texts=200)
    processor = build_qwen_processor(tok)
    batches = ground_truth_batches(Batcher(processor), 4)
    shallow = build_qwen_vlm(spec(2), tok)
    train_model(shallow, batches, steps=15, lr=3e-3, warmup=3, name="shallow", log_every=5)
    deep = grow(shallow, build_qwen_vlm(spec(6), tok)).eval()

    batch = next(batches)
    batch.pop("labels")
    with torch.no_grad():
        want, got = shallow(**batch).logits, deep(**batch).logits
        other = dict(batch, pixel_values=torch.flip(batch["pixel_values"], [0]))
        assert not torch.allclose(shallow(**other).logits, want, atol=1e-3)  # the logits depend on the image
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    new_layer = deep.model.language_model.layers[1]
    assert not new_layer.self_attn.o_proj.weight.any()
    train_model(deep, batches, steps=3, lr=3e-3, warmup=1, name="deep", log_every=1)
    assert new_layer.self_attn.o_proj.weight.any() and new_layer.mlp.down_proj.weight.any()


def test_the_recipe_trains_the_shallow_decoder_first_and_counts_its_batches():
    from training.train import shallow_spec, target_steps

    assert shallow_spec(spec(8), 2)["text"]["num_hidden_layers"] == 2
    assert shallow_spec(spec(8), 2)["vision"] == spec(8)["vision"]
    assert shallow_spec(spec(8), None) == spec(8)
    assert target_steps({"steps": 100}) == 100
    assert target_steps({"steps": 100, "shallow_layers": 2, "grown": {"steps": 30}}) == 130
