"""The state of the rows being decoded: a Sequence per row, and groups of them that are verified together."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request


@dataclass
class Sequence:
    index: int  # position in the caller's request list
    request: Request
    prompt_len: int  # tokens of the prompt in the target's cache (fewer than the prompt's with pruned image tokens)
    generated: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    finish: str | None = None  # stop | length, once finished
    topk: list = field(default_factory=list)  # with capture_topk: the target's (logits, ids) per generated position


@dataclass
class SequenceGroup:
    """Sequences verified together in one target forward: their slots in their own target cache, and their own
    drafter (a drafter over another group's weights, or a channel to a drafter server). While one group is
    verified, another group's drafts can be in flight on a drafter server."""
    index: int
    slots: int
    cache: object  # KVCache (engine/kv_cache.py), or the fallback decoder's HiddenStore
    drafter: object | None  # engine/drafter.py's interface, or None: plain decoding
    active: list[Sequence] = field(default_factory=list)  # live sequences, in slots 0..len-1
    pending: tuple | None = None  # (k, handle): the drafts requested at the end of the last round
