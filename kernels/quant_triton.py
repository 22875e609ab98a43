"""The GPU weight-only matmul: y = x @ dequantize(W).T with W held as int8 or int4 (kernels/quant.py's
portable form). Each program computes a [BLOCK_M, BLOCK_N] tile of y; along K it loads the quantized
weight tile, dequantizes it in registers with its group's scale (and zero), and accumulates in float32,
so the dense weight never exists in memory. Tested against kernels/quant.linear_reference under
TRITON_INTERPRET=1 (tests/test_quant.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:  # the hint only: kernels/quant.py imports this module when its kernel is triton
    from kernels.quant import QuantizedWeight


@triton.jit
def _quant_linear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G,
                         stride_xm, stride_wn, stride_sn, stride_ym,
                         BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :],
                    other=0.0).to(tl.float32)
        wmask = (rn[:, None] < N) & kmask[None, :]
        group = rk // G
        scale = tl.load(s_ptr + rn[:, None] * stride_sn + group[None, :], mask=wmask, other=0.0)
        if BITS == 8:
            q = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=wmask, other=0).to(tl.float32)
            w = q * scale
        else:
            byte = tl.load(w_ptr + rn[:, None] * stride_wn + (rk // 2)[None, :], mask=wmask, other=0).to(tl.int32)
            q = ((byte >> ((rk % 2) * 4)[None, :]) & 15).to(tl.float32)
            zero = tl.load(z_ptr + rn[:, None] * stride_sn + group[None, :], mask=wmask, other=0.0)
            w = (q - 8.0) * scale + zero
        acc += tl.dot(x, tl.trans(w))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def quant_linear(x: torch.Tensor, qw: QuantizedWeight, block_m: int = 16, block_n: int = 64,
                 block_k: int = 64) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype."""
    m, k = x.shape
    n = qw.shape[0]
    if k != qw.shape[1]:
        raise ValueError(f"x has {k} input channels, the weight {qw.shape[1]}")
    x = x.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    scales = qw.scales.float().contiguous()
    zeros = scales if qw.zeros is None else qw.zeros.float().contiguous()
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_linear_kernel[grid](x, qw.qweight, scales, zeros, y, m, n, k, qw.group_size,
                               x.stride(0), qw.qweight.stride(0), scales.stride(0), y.stride(0),
                               BITS=qw.bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y
