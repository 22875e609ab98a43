"""A bf16 linear weight held in oneDNN's blocked layout on a CPU, reordered once at load.

`F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every call. At a decode step's
few rows that reorder costs as much as the matmul: measured on a 2-core Zen 4 (AVX-512 bf16), the decoder's
linears at 32 rows ran 1.3-2.5x faster prepacked, and 1.1x faster at a prefill's 3,200 rows. The result is bit
for bit F.linear's (the same kernel, without the reorder; tests/engine/test_packed.py). Float32 gains nothing
this way (MKL's packed path measured no faster), and CUDA has no such reorder: both keep plain tensors.

The dense weight is not kept beside the packed one (that would double the weights' memory): `dense()` gives it
back exactly, as the packed matmul of an identity (each output is one weight times 1).
"""
from __future__ import annotations

import torch

ROWS_HINT = 64  # the batch size oneDNN tunes the layout for; any number of rows is served


def packs(device: str, dtype: torch.dtype) -> bool:
    """Whether weights of this device and dtype are held packed."""
    return device == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


class PackedLinear:
    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ROWS_HINT)
        self.nbytes = weight.numel() * weight.element_size()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> x @ weight.T + bias, [..., out]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def dense(self) -> torch.Tensor:
        """The weight [out, in], exactly."""
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return self(eye).t().contiguous()
