"""Weight-only quantization: the quantizers' error bounds, the CPU kernels and the Triton kernel (under Triton's
interpreter) against the torch reference. The quantized decoder in the engine: tests/test_compression.py."""
from __future__ import annotations

import pytest
import torch

from kernels.quant import QuantLinear, dequantize, linear_reference, quantize, unpack_int4
from tests.conftest import run_under_triton_interpreter


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 64)])
def test_round_to_nearest_error_is_within_half_a_step(bits, group):
    w = torch.randn(128, 192, generator=torch.Generator().manual_seed(bits + group))
    qw = quantize(w, bits, group)
    err = (dequantize(qw) - w).abs()
    if bits == 8:
        step = qw.scales  # [N, 1]
        assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (128, 192)
    else:
        step = qw.scales.repeat_interleave(group, 1)
        assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (128, 96)  # two weights per byte
        assert unpack_int4(qw.qweight).max() <= 15
    assert (err <= step / 2 + 1e-6).all()
    assert err.max() > 0  # it really is quantized


def test_int4_group_size_must_divide_the_input_channels():
    with pytest.raises(ValueError, match="group size 128"):
        quantize(torch.randn(64, 1088), 4, 128)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 64)])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 400])  # the packed kernels (few rows) and dequantize-then-GEMM
def test_cpu_kernels_match_the_reference(bits, group, rows):
    g = torch.Generator().manual_seed(rows)
    w, x, b = torch.randn(192, 256, generator=g), torch.randn(rows, 256, generator=g), torch.randn(192, generator=g)
    qw = quantize(w, bits, group or 64)
    layer = QuantLinear(qw, "cpu", bias=b.bfloat16())
    assert layer.kernel == f"cpu-int{bits}"
    ref = linear_reference(x.bfloat16().float(), qw, b)
    got = layer(x.bfloat16()).float()
    assert got.dtype == torch.float32 and got.shape == (rows, 192)
    # bf16 activations and scales: agreement to bf16 precision of the outputs
    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)
    assert layer.nbytes < w.numel() * 2 * (0.55 if bits == 8 else 0.33)  # int8: 8 bits + a scale per row; int4: 4 + 1 bit of scale and zero at g=32


def test_cpu_fallback_for_shapes_without_a_packed_kernel():
    qw = quantize(torch.randn(48, 64), 4, 32)  # 48 output rows: no CPU int4 pack
    layer = QuantLinear(qw, "cpu")
    assert layer.kernel == "cpu-dequant"
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), linear_reference(x, qw), atol=0.05, rtol=0.02)


KERNEL_CHECK = r"""
import torch
from kernels.quant import quantize, linear_reference
from kernels.quant_triton import quant_linear
g = torch.Generator().manual_seed(0)
for bits, group, m, n, k, bm, bn, bk in [(8, 0, 5, 96, 128, 16, 32, 32), (4, 32, 7, 80, 128, 16, 32, 64),
                                         (4, 64, 33, 64, 192, 16, 64, 64), (8, 0, 1, 40, 80, 16, 32, 32)]:
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    qw = quantize(w, bits, group or 64)
    got = quant_linear(x, qw, block_m=bm, block_n=bn, block_k=bk)
    ref = linear_reference(x, qw)
    assert got.shape == (m, n), got.shape
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-4), (bits, group, (got - ref).abs().max())
print("ok")
"""


def test_triton_kernel_matches_the_reference_under_the_interpreter():
    run_under_triton_interpreter(KERNEL_CHECK)
