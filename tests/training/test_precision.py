"""train.precision (training/optim.py): where the recipe trains in bf16 autocast, that a step then does its matrix
work in bf16 while the weights the optimiser updates stay float32, and that a bad value is a config error."""
from __future__ import annotations

import pytest
import torch

from training.modelpair import build_qwen_processor, build_qwen_text_lm
from training.optim import uses_bf16
from training.tokenizer import train_tokenizer
from training.train import Batcher, ground_truth_batches, train_model


@pytest.mark.parametrize("precision, device, native, expected", [
    ("auto", "cpu", True, True), ("auto", "cpu", False, False), ("auto", "cuda", False, True),
    ("auto", "cuda:1", False, True), ("bf16", "cpu", False, True), ("float32", "cuda", True, False)])
def test_auto_is_bf16_where_the_hardware_does_it_natively(monkeypatch, precision, device, native, expected):
    monkeypatch.setattr("engine.device.cpu_has_native_bf16", lambda: native)
    assert uses_bf16(precision, device) is expected


def test_the_recipe_refuses_an_unknown_precision_before_training(capsys):
    from training.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["configs/modelpair_qwen.yaml", "--set", "train.precision=fp16", "--output-dir", "/nonexistent"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train.precision: 'fp16' is not one of auto, bf16, float32" in err, err


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    tok = train_tokenizer(num_texts=200)
    spec = {"text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": 128}}
    return tok, lambda: build_qwen_text_lm(spec, tok)


@pytest.mark.parametrize("bf16", [True, False])
def test_a_bf16_step_computes_in_bf16_updates_float32_weights_and_learns(text_model, bf16):
    tok, build = text_model
    torch.manual_seed(0)
    model = build()
    seen = set()
    model.lm_head.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    batches = ground_truth_batches(Batcher(build_qwen_processor(tok), with_image=False), 8)
    losses = train_model(model, batches, steps=30, lr=3e-3, warmup=3, name="bf16" if bf16 else "fp32",
                         log_every=10, bf16=bf16)
    assert seen == {torch.bfloat16 if bf16 else torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert losses[-1] < 0.8 * losses[0], losses
