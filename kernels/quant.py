"""Weight-only quantization of linear layers: int8 per output channel, int4 per group of input channels.

    int8   w ≈ q · s[n]                      q in [-127, 127], one scale per output row (symmetric)
    int4   w ≈ (q - 8) · s[n, g] + z[n, g]   q in [0, 15], a scale and a zero per row and group of
                                             `group_size` input channels (asymmetric: z = min + 8 s)

`QuantizedWeight` is the portable form (int8 [N, K], or two int4 per byte [N, K/2]: low nibble = even k);
`linear_reference` is the torch reference every kernel is tested against; `QuantLinear` is what a decoder
holds, and it picks the kernel for the device when it is built:

- CUDA: the Triton kernel (kernels/quant_triton.py), dequantizing tiles in registers.
- CPU: PyTorch's packed weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) for
  few rows (decode and verify: their cost grows with the rows, and at a few rows they beat even bf16), and
  dequantize-then-GEMM in bf16 for many rows (prefill: compute-bound, the dequantization is amortized).
  Activations go through bf16 in both: the packed kernels are slow in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.cuda_timing import cuda_ms


@dataclass
class QuantizedWeight:
    bits: int  # 8 or 4
    group_size: int  # input channels per scale (int8: K, one scale per output row)
    shape: tuple[int, int]  # (N, K) of the dense weight
    qweight: torch.Tensor  # int8 [N, K] | uint8 [N, K // 2]
    scales: torch.Tensor  # float32 [N, K // group_size]
    zeros: torch.Tensor | None  # float32 [N, K // group_size] (int4)


def quantize(weight: torch.Tensor, bits: int, group_size: int = 64) -> QuantizedWeight:
    """Round-to-nearest quantization of a dense [N, K] weight (computed in float32)."""
    w = weight.detach().float()
    n, k = w.shape
    if bits == 8:
        scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-8)
        q = (w / scale).round().clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(8, k, (n, k), q, scale, None)
    if bits != 4:
        raise ValueError(f"bits must be 8 or 4, not {bits}")
    if k % group_size or group_size % 2:
        raise ValueError(f"int4 group size {group_size} does not divide the layer's {k} input channels")
    g = w.view(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).view(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return QuantizedWeight(4, group_size, (n, k), packed.contiguous(), scale, lo + 8 * scale)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] values 0..15."""
    return torch.stack([packed & 15, packed >> 4], -1).view(packed.shape[0], -1)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = qw.shape
    if qw.bits == 8:
        return (qw.qweight.float() * qw.scales).to(dtype)
    q = unpack_int4(qw.qweight).float().view(n, k // qw.group_size, qw.group_size)
    return ((q - 8) * qw.scales[..., None] + qw.zeros[..., None]).view(n, k).to(dtype)


def linear_reference(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize(qw).T in float32: what every kernel must compute."""
    out = x.float() @ dequantize(qw).T
    return out if bias is None else out + bias.float()


# ---- the CPU path ---------------------------------------------------------------------------------

# above this many rows, dequantize-then-GEMM is faster than the packed kernel (measured by benchmarks/compression.py's
# kernel table on the 2-core CPU): dequantizing int8 is one multiply, unpacking int4 from its blocked layout costs more
CPU_PACKED_MAX_ROWS = {8: 16, 4: 384}


# PyTorch's CPU int4 pack puts output rows in blocks whose size follows the CPU's vector width (64 rows with
# AVX-512, 32 with AVX2); each is tried, and the one that reads the weight back exactly is used
CPU_INT4_BLOCKS = (64, 32)


def _cpu_int4_unpack(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """PyTorch's CPU int4 pack (blocks of `block` rows; per k, byte j holds rows j and j+block/2) -> uint8 [N, K]."""
    blocks = packed.view(n // block, k, block // 2)
    rows = torch.cat([blocks & 15, blocks >> 4], -1)  # [N/block, K, block]
    return rows.transpose(1, 2).reshape(n, k)


def _cpu_int4_pack(q: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """q uint8 [N, K] in PyTorch's CPU int4 pack, and the block layout that reads it back; None if none does."""
    n, k = q.shape
    if n % min(CPU_INT4_BLOCKS):
        return None
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    for block in CPU_INT4_BLOCKS:
        if n % block == 0 and torch.equal(_cpu_int4_unpack(packed, n, k, block), q):
            return packed, block
    return None


_CUDA_CHOICE: dict[tuple, str] = {}  # (bits, group size, shape, rows bucket) -> the faster CUDA kernel


class QuantLinear:
    """y = x @ W.T (+ bias) with W held quantized; call it like F.linear's weight."""

    def __init__(self, qw: QuantizedWeight, device: str, bias: torch.Tensor | None = None):
        self.bits, self.group_size, self.shape = qw.bits, qw.group_size, qw.shape
        self.device = torch.device(device)
        self.bias = bias
        n, k = qw.shape
        if self.device.type == "cuda":
            self.qw = QuantizedWeight(qw.bits, qw.group_size, qw.shape, qw.qweight.to(device),
                                      qw.scales.to(device), None if qw.zeros is None else qw.zeros.to(device))
            self.kernel = "triton"
        elif qw.bits == 8:
            self.q = qw.qweight.contiguous()
            self.scale = qw.scales[:, 0].to(torch.bfloat16).contiguous()
            self.kernel = "cpu-int8"
        elif (packed := _cpu_int4_pack(unpack_int4(qw.qweight))) is not None:
            self.packed, self.block = packed
            self.scales_zeros = torch.stack([qw.scales, qw.zeros], -1).transpose(0, 1).to(torch.bfloat16).contiguous()
            self.kernel = "cpu-int4"
        else:  # no packed kernel for this shape (or a pack layout this file cannot read back): dequantize per call
            self.qw = qw
            self.kernel = "cpu-dequant"

    @property
    def nbytes(self) -> int:
        tensors = [getattr(self, a) for a in ("q", "scale", "packed", "scales_zeros") if hasattr(self, a)]
        if hasattr(self, "qw"):
            tensors += [t for t in (self.qw.qweight, self.qw.scales, self.qw.zeros) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight [N, K]."""
        n, k = self.shape
        if self.kernel == "cpu-int8":
            return self.q.to(dtype) * self.scale[:, None].to(dtype)
        if self.kernel == "cpu-int4":
            q = _cpu_int4_unpack(self.packed, n, k, self.block).to(dtype).view(n, k // self.group_size, self.group_size)
            sz = self.scales_zeros.transpose(0, 1).to(dtype)  # [N, groups, 2]
            return ((q - 8) * sz[..., 0:1] + sz[..., 1:2]).view(n, k)
        return dequantize(self.qw, dtype)

    def kernel_for(self, rows: int) -> str:
        """The kernel that serves `rows` rows. On CUDA, the faster of the Triton kernel and dequantize + cuBLAS
        (which wins at a prefill's rows, where the matmul, not reading the weight, is the cost): raced once per
        power-of-two bucket of rows, for every linear of this shape (a sync then, at warm-up, never after). On a
        CPU, the kernel chosen at load."""
        if self.kernel != "triton":
            return self.kernel
        bucket = 1 << max(0, rows - 1).bit_length()
        key = (self.bits, self.group_size, self.shape, bucket)
        if key not in _CUDA_CHOICE:
            _CUDA_CHOICE[key] = self._race(bucket)
        return _CUDA_CHOICE[key]

    def _race(self, rows: int, reps: int = 10) -> str:
        from kernels.quant_triton import quant_linear

        x = torch.randn(rows, self.shape[1], device=self.device, dtype=torch.bfloat16)
        times = {"triton": cuda_ms(lambda: quant_linear(x, self.qw), reps, warmup=1),
                 "cuda-dequant": cuda_ms(lambda: F.linear(x, dequantize(self.qw, torch.bfloat16)), reps, warmup=1)}
        return min(times, key=times.get)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        kernel = self.kernel_for(x2.shape[0])
        if kernel == "triton":
            from kernels.quant_triton import quant_linear
            out = quant_linear(x2, self.qw)
        elif kernel == "cuda-dequant":
            out = F.linear(x2, dequantize(self.qw, x2.dtype))
        elif kernel == "cpu-dequant" or x2.shape[0] > CPU_PACKED_MAX_ROWS[self.bits]:
            out = F.linear(x2.to(torch.bfloat16), self.dense(torch.bfloat16))
        elif kernel == "cpu-int8":
            out = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.q, self.scale)
        else:
            out = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.packed,
                                                    self.group_size, self.scales_zeros)
        out = out.to(dtype).view(*shape[:-1], self.shape[0])
        return out if self.bias is None else out + self.bias
