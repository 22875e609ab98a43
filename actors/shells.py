"""The shells the pools start their actors with (actors/actor_pool.py): a target shell and a drafter shell.

The pool manager starts them without importing torch (which would cost it seconds of a busy CPU before the first
actor could start); the engine is imported and built inside the actor.
"""
from __future__ import annotations


class TargetShell:
    """A target actor (actors/target_actor.py's TargetActor)."""

    def __init__(self, **kwargs):
        from actors.target_actor import TargetActor
        self.impl = TargetActor(**kwargs)

    def ping(self) -> str:
        return self.impl.ping()

    def generate_batch(self, batch):
        return self.impl.run_batch(batch)


class DrafterShell:
    """A drafter actor (actors/drafter_server.py's DrafterServer)."""

    def __init__(self, **kwargs):
        from actors.drafter_server import DrafterServer
        self.impl = DrafterServer(**kwargs)

    def ping(self) -> str:
        return self.impl.ping()

    def step(self, channel: str, ops: list, histories: list, k: int, params):
        return self.impl.step(channel, ops, histories, k, params)

    def release(self, channel: str) -> None:
        self.impl.release(channel)

    def active_channels(self) -> int:
        return self.impl.active_channels()
