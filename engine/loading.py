"""The backend an EngineConfig names, loaded on its device in its dtype: the one entry point hosts use."""
from __future__ import annotations

from engine.config import EngineConfig


def make_engine(config: EngineConfig, device: str | None = None):
    """`specray`: the speculative engine (engine/engine.py); `hf`: model.generate (engine/hf_backend.py)."""
    if config.backend == "hf":
        from engine.hf_backend import HFBackend
        return HFBackend(config, device)
    if config.backend == "specray":
        from engine.engine import SpecEngine
        return SpecEngine(config, device)
    raise ValueError(f"decoding.backend: unknown backend {config.backend!r}")
