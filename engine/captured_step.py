"""A decode or verify step of the lean decoder (engine/decoder.py) compiled once per shape bucket: `torch.compile`,
with CUDA graphs on CUDA (mode "reduce-overhead"), inductor's default mode on a CPU.

A step is embed -> LeanDecoder.forward -> logits over a group's slot cache: the target's verify (T = k+1 per row),
a model drafter's catch-up (T = the widest row's new tokens, `last` picking each row's final one) and its decode
steps (T = 1). Shapes are static, so each bucket compiles once (and its CUDA graph is captured once):

    batch    n rows are run as b = the next power of two (at most the cache's slots): live rows are always slots
             0..n-1 (engine/kv_cache.py), so the b - n padding rows are free slots n..b-1; they write keys and
             values there at positions 0..T-1, which an admission's prefill overwrites before the slot is used
    T        exact
    keys     the attended length, max(starts) + T from the host's bookkeeping, rounded up to a power of two (64 at
             least, the cache's max_len at most); keys past a row's own positions are masked by the causal mask,
             which the decoder derives in the graph from the rows' positions (engine/attention.py)

Nothing is read back from the device to pick a bucket: the host knows n, T and the length. Results are the eager
step's up to float rounding (inductor fuses and reorders reductions; token-exact in float32 on the tests' models:
tests/engine/test_captured_step.py).

Compiled code is cached on disk by inductor's FX graph cache, under TORCHINDUCTOR_CACHE_DIR (default here:
~/.cache/specray/inductor, or $SPECRAY_COMPILE_CACHE): a later process pays the compile again only in part. The
seconds of each bucket's first call (compile and one run; CUDA graph trees record the graph at a following call)
are kept in `compile_s` and `buckets`; the engine reports them in its stats.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

MIN_KEYS = 64  # the smallest attended-length bucket
CACHE_DIR = os.environ.get("SPECRAY_COMPILE_CACHE", str(Path.home() / ".cache" / "specray" / "inductor"))


def compiles(setting: str, device: str) -> bool:
    """EngineConfig.compile ("off", "on", "auto": on for CUDA) for a model on `device`."""
    return setting == "on" or (setting == "auto" and device == "cuda")


def batch_bucket(n: int, slots: int) -> int:
    return min(1 << (n - 1).bit_length(), slots)


def keys_bucket(length: int, max_len: int) -> int:
    return min(max(MIN_KEYS, 1 << (length - 1).bit_length()), max_len)


def _held_tensors(dec) -> list[torch.Tensor]:
    """Every tensor a step reads that stays put between steps: the weights (dense, packed or quantized) and the
    rotary frequencies. CUDA graphs copy any other input into their own buffers at each replay."""
    out = list(dec.dense_tensors()) + list(dec.backbone.inv_freqs)
    out += [dec.embed_scale] if dec.embed_scale is not None else []
    for w in [dec.head_weight] + [p[n] for p in dec.layers for n in dec.LINEARS]:
        if not isinstance(w, torch.Tensor):
            out += [t for t in vars(w).values() if isinstance(t, torch.Tensor)]
            qw = getattr(w, "qw", None)
            out += [t for t in (getattr(qw, "qweight", None), getattr(qw, "scales", None), getattr(qw, "zeros", None))
                    if isinstance(t, torch.Tensor)]
    return out


class CapturedStep:
    """Steps of one decoder: compiled when `enabled`, else the eager forward (the same call either way)."""

    def __init__(self, decoder, device: str, enabled: bool):
        self.dec, self.device, self.enabled = decoder, device, enabled
        if enabled and hasattr(decoder, "unpack"):  # a CPU's packed bf16 weights: inductor lowers plain ones only
            decoder.unpack()
        self.buckets: dict[tuple, float] = {}  # bucket -> seconds of its first call
        self._compiled = None

    @property
    def compile_s(self) -> float:
        return sum(self.buckets.values())

    def _fn(self):
        if self._compiled is None:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", CACHE_DIR)
            # every bucket is a recompile of the same function: dynamo's default limit (8) would fall back to eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4096)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 1 << 16)
            mode = "reduce-overhead" if self.device == "cuda" else None
            self._compiled = torch.compile(self._step, mode=mode, dynamic=False)
        return self._compiled

    def _step(self, cache, ids: torch.Tensor, starts: torch.Tensor, last: torch.Tensor | None, length: int):
        dec = self.dec
        return dec.logits(dec.forward(cache, dec.embed(ids), starts, last=last, length=length))

    def __call__(self, cache, ids: torch.Tensor, starts: torch.Tensor, length: int,
                 last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [n, T, V] of token ids [n, T] fed at starts [n] to slots 0..n-1 of `cache` ([n, 1, V] with
        `last` [n]: each row's position whose logits are wanted). `length`: max(starts) + T, from the host."""
        if not self.enabled:
            return self._step(cache, ids, starts, last, length)
        n, t = ids.shape
        b, keys = batch_bucket(n, cache.slots), keys_bucket(length, cache.max_len)
        # padding rows: free slots n..b-1, fed token 0 at position 0; every input contiguous, as a padded one is
        # (a bucket's graph is specialised to its inputs' strides)
        ids = torch.nn.functional.pad(ids, (0, 0, 0, b - n)).contiguous()
        starts = torch.nn.functional.pad(starts, (0, b - n)).contiguous()
        last = None if last is None else torch.nn.functional.pad(last, (0, b - n)).contiguous()
        if self.device == "cuda":
            self._mark_static(cache)
            torch.compiler.cudagraph_mark_step_begin()
        key = (b, t, keys, last is not None, cache.slots, cache.max_len)
        first = key not in self.buckets
        t0 = time.perf_counter()
        logits = self._fn()(cache, ids, starts, last, keys)
        if first:
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.buckets[key] = time.perf_counter() - t0
        # a CUDA graph's output is overwritten by its next replay: the caller gets its own copy
        return logits[:n].clone() if self.device == "cuda" else logits[:n]

    def _mark_static(self, cache) -> None:
        """CUDA graphs read the weights and the cache in place (a cache is mutated by every step): each marked
        once, and again when its tensors are new (a cache reallocated, a learning drafter's weights reloaded)."""
        dec = self.dec
        if getattr(dec, "_specray_static", None) is not dec.embed_weight:
            for t in _held_tensors(dec):
                torch._dynamo.mark_static_address(t)
            dec._specray_static = dec.embed_weight
        if getattr(cache, "_specray_static", None) is not cache.k[0]:
            for t in cache.k + cache.v + [cache.rope_offset]:
                torch._dynamo.mark_static_address(t)
            cache._specray_static = cache.k[0]


def compile_stats(steps: list[CapturedStep | None]) -> dict:
    """The engine's stats of its compiled steps: seconds of first calls and buckets compiled, in all."""
    live = [s for s in steps if s is not None and s.enabled]
    return {"compile_s": sum(s.compile_s for s in live), "compile_buckets": sum(len(s.buckets) for s in live)}
