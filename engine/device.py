"""Where an engine runs and in which dtype: the device a host's resources give it, and the dtype `auto` resolves to
on it (bf16 where the hardware does bf16 matrix work, float32 where it would only emulate it)."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(gpus: float) -> str:
    """cuda when the host was given a GPU and torch sees one, else cpu."""
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 matrix work in hardware (AMX or AVX512-BF16). Without it (AVX2), torch emulates
    bf16 and a bf16 model runs several times slower than in float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str, backend: str, device: str) -> torch.dtype:
    """`auto`: bf16 on CUDA, and on a CPU with native bf16 for the specray engine; float32 otherwise (the hf
    reference on any CPU, and the specray engine on a CPU that would only emulate bf16)."""
    if name != "auto":
        return DTYPES[name]
    if device == "cuda" or (backend == "specray" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32
