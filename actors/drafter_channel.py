"""The channel a target's group of sequences drafts through, to a drafter server (actors/drafter_server.py).

It has the local drafter's interface (engine/drafter.py): allocate/seed/admit/commit/move are buffered and
travel with the next draft request, so a round costs one call. It remembers what its live slots hold (prompt ids
and image inputs), so when its server dies, is drained or restarts empty, it replays them on another server,
which rebuilds its cache and catches up on the generated tokens from the histories; with no server left, the
group goes on without speculation (k = 0) and rebinds as soon as one is assigned again.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import ray
import torch

from actors.drafter_server import UnknownChannel
from engine.request import SamplingParams


class DrafterChannel:
    """One group's channel to a drafter server. `servers()` returns the (id, handle) pairs currently assigned to
    this group, preferred first; the channel binds to the first live one and follows the assignment."""
    remote = True

    def __init__(self, channel: str, servers: Callable[[], list[tuple[str, object]]], device: str = "cpu"):
        self.channel = channel
        self.servers = servers
        self.device = device
        self.bound: tuple[str, object] | None = None
        self.dead: set[str] = set()
        self.ops: list[tuple] = []
        self.shape = (0, 0)
        self.seed_value = 0
        self.held: list[tuple[list[int], dict] | None] = []  # per slot: (prompt ids, image inputs)
        self.failovers = 0

    # ---- the drafter interface, buffered ----------------------------------------------------------

    def allocate(self, slots: int, max_len: int) -> None:
        self.shape = (slots, max_len)
        self.held = [None] * slots
        self.ops = []
        self._unbind()  # the next request starts the channel afresh

    def seed(self, seed: int) -> None:
        self.seed_value = seed
        self.ops.append(("seed", seed))

    def admit(self, first: int, prompts: list[list[int]], arrays: list[dict[str, np.ndarray]]) -> None:
        self.ops.append(("admit", first, prompts, arrays))
        for i, (p, a) in enumerate(zip(prompts, arrays)):
            self.held[first + i] = (p, a)

    def commit(self, accepted: list[int]) -> None:
        self.ops.append(("commit", accepted))

    def move(self, src: list[int], dst: list[int]) -> None:
        if src:
            self.ops.append(("move", src, dst))
            for s, d in zip(src, dst):
                self.held[d] = self.held[s]

    def close(self) -> None:
        self._unbind()

    # ---- requests ---------------------------------------------------------------------------------

    def _replay(self, n: int) -> list[tuple]:
        """Ops that rebuild this channel's live slots 0..n-1 on a server that holds nothing of it."""
        held = self.held[:n]
        return [("allocate", *self.shape), ("seed", self.seed_value),
                ("admit", 0, [h[0] for h in held], [h[1] for h in held])]

    def _unbind(self) -> None:
        if self.bound is not None:
            try:
                self.bound[1].release.remote(self.channel)
            except Exception:  # noqa: BLE001 - a dead server holds nothing to release
                pass
        self.bound = None

    def _pick(self) -> tuple[str, object] | None:
        assigned = [s for s in self.servers() if s[0] not in self.dead]
        if self.bound is not None and any(s[0] == self.bound[0] for s in assigned):
            return self.bound
        self._unbind()  # drained or dead: move to the first assigned server
        return assigned[0] if assigned else None

    def submit(self, histories: list[list[int]], k: int, params: SamplingParams):
        server = self._pick()
        if server is None:
            self.ops = []
            return None
        ops, self.ops = (self.ops if self.bound is not None else self._replay(len(histories))), []
        self.bound = server
        return server, server[1].step.remote(self.channel, ops, histories, k, params), histories, k, params

    def collect(self, handle):
        """The drafts of `submit`; on a lost server, the same request on another one (or no drafts)."""
        n = len(handle[2]) if handle is not None else 0
        for _ in range(4):
            if handle is None:
                break
            server, ref, histories, k, params = handle
            try:
                drafts, num, probs, seconds = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                if not isinstance(e.as_instanceof_cause(), UnknownChannel):
                    raise
                self.bound = None  # the server restarted empty: replay there
            except ray.exceptions.RayActorError:
                self.dead.add(server[0])
                self.bound = None
            else:
                q = None if probs is None else torch.tensor(probs, device=self.device)
                return (torch.tensor(drafts, device=self.device), torch.tensor(num, device=self.device), q, seconds)
            self.failovers += 1
            handle = self.submit(histories, k, params)
        self.bound = None
        return (torch.zeros(n, 0, dtype=torch.long, device=self.device),
                torch.zeros(n, dtype=torch.long, device=self.device), None, 0.0)
