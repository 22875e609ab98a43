"""Drafting in another actor: the drafter server (one drafter model, many channels; actors/drafter_channel.py is
the channel a target's group of sequences uses).

    target actor, group g ──channel── step(ops, histories, k) ──►  DrafterServer (its own cache per channel)
                          ◄── drafts [n, k], num [n], draft probs [n, k, V] (sampling only), draft seconds ──┘

Only token ids travel (plus a row's prompt and image inputs once, at admission, and draft probabilities when
sampling); never KV tensors. Each side keeps its own cache: the server's drafter rolls back on the verdict.

Each channel is a fork of the server's drafter (engine/drafter.py): the same weights, its own cache and slots.
"""
from __future__ import annotations

import time
import ray
import torch
from transformers import AutoConfig, AutoTokenizer

from engine.config import EngineConfig
from engine.drafter import make_drafter
from engine.device import resolve_device, resolve_dtype
from engine.model import image_token_id
from engine.request import SamplingParams


class UnknownChannel(KeyError):
    """The server holds no state for this channel (it restarted, or never saw it): the channel must replay."""


class DrafterServer:
    """A drafter model behind a Ray actor. Channels are independent: each has its own cache and slots."""

    def __init__(self, config: EngineConfig):
        """`config`: the job's engine config, with the drafter server's own gpus and threads."""
        torch.set_num_threads(max(1, config.threads))
        self.device = resolve_device(config.gpus)
        dtype = resolve_dtype(config.dtype, config.backend, self.device)
        trust = config.trust_remote_code
        target = AutoConfig.from_pretrained(config.target, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(config.target, trust_remote_code=trust)
        _, compression = config.compression.for_models(config.drafter)
        self.drafter = make_drafter(config.drafter, tokenizer, image_token_id(target), self.device, dtype, trust,
                                    config.lean, compression=compression, target=config.target)
        self.channels: dict[str, object] = {}  # channel -> its fork of the drafter
        self.busy_s = 0.0
        self.calls = 0

    def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def active_channels(self) -> int:
        return len(self.channels)

    def load(self) -> dict:
        return {"busy_s": self.busy_s, "calls": self.calls, "channels": len(self.channels)}

    def release(self, channel: str) -> None:
        self.channels.pop(channel, None)

    @torch.inference_mode()
    def step(self, channel: str, ops: list[tuple], histories: list[list[int]], k: int, params: SamplingParams):
        t0 = time.perf_counter()
        d = self.channels.get(channel)
        if d is None and (not ops or ops[0][0] != "allocate"):
            raise UnknownChannel(channel)
        for op, *args in ops:
            if op == "allocate":  # a fresh channel (or a replay): drop whatever it held
                d = self.channels[channel] = self.drafter.fork()
            getattr(d, op)(*args)  # allocate, seed, admit, commit, move
        drafts, num, probs = d.propose(histories, k, params)
        if self.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.busy_s += seconds
        self.calls += 1
        out_probs = None if probs is None else probs.float().cpu().numpy()
        return drafts.cpu().numpy(), num.cpu().numpy(), out_probs, seconds
