"""bf16 weights held packed for oneDNN (kernels/packed.py): bit for bit F.linear's, at any number of rows, and the
lean decoder in bf16 on a CPU holds its linears that way with the same logits as unpacked."""
from __future__ import annotations

import pytest
import torch

from kernels.packed import PackedLinear, packs

pytestmark = pytest.mark.skipif(not packs("cpu", torch.bfloat16), reason="no oneDNN in this torch")


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_is_f_linear_bit_for_bit(rows):
    torch.manual_seed(rows)
    w = torch.randn(96, 80, dtype=torch.bfloat16)
    b = torch.randn(96, dtype=torch.bfloat16)
    x = torch.randn(2, rows, 80, dtype=torch.bfloat16)
    packed = PackedLinear(w)
    assert torch.equal(packed(x), torch.nn.functional.linear(x, w))
    assert torch.equal(packed(x, b), torch.nn.functional.linear(x, w, b))
    assert torch.equal(packed.dense(), w)


def test_float32_and_cuda_keep_plain_weights():
    assert not packs("cpu", torch.float32) and not packs("cuda", torch.bfloat16)


@torch.inference_mode()
def test_the_bf16_decoder_holds_packed_weights_with_the_same_logits(monkeypatch):
    from engine.model import LoadedModel
    from tests.conftest import ROOT

    model = LoadedModel(str(ROOT / "models/target"), "cpu", torch.bfloat16)
    dec = model.decoder
    assert all(isinstance(p[n], PackedLinear) for p in dec.layers for n in dec.LINEARS)
    monkeypatch.setattr("engine.decoder.packs", lambda device, dtype: False)
    unpacked = LoadedModel(str(ROOT / "models/target"), "cpu", torch.bfloat16).decoder
    assert all(isinstance(p[n], torch.Tensor) for p in unpacked.layers for n in unpacked.LINEARS)
    ids = torch.randint(5, 500, (3, 9))
    out = []
    for d in (dec, unpacked):
        cache = d.new_cache()
        cache.allocate(3, 16)
        out.append(d.logits(d.forward(cache, d.embed(ids), torch.zeros(3, dtype=torch.long))))
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0][0], out[0][1])  # the rows' logits follow their own tokens
    assert dec.linear_bytes() == unpacked.linear_bytes()
    # quantizing starts from the exact dense weights (self-speculation's drafter is quantized from the target's)
    q_packed, q_plain = dec.quantized_copy(8), unpacked.quantized_copy(8)
    assert all(torch.equal(a[n].q, b[n].q) for a, b in zip(q_packed.layers, q_plain.layers) for n in dec.LINEARS)
