"""resources.memory_per_actor, enforced in the actor's own process as a container's memory limit is enforced: a
process whose resident memory passes the limit is killed at once (SIGKILL), as the kernel's OOM killer kills a
cgroup over its memory.max. A watchdog thread reads the process's resident set every 2 ms; it needs no
privileges, so it works where no cgroup can be made (a laptop, a shared node).

An allocation that fails instead (CUDA out of memory, a CPU allocator's error) raises in the engine and takes
the generate actor's split-and-retry path (actors/generate_actor.py); a kill takes the worker-death path
(actors/worker_deaths.py)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
POLL_S = 0.002


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def enforce_memory_limit(limit: int) -> threading.Thread:
    """Watch this process's resident memory; kill the process once it passes `limit` bytes."""
    def watch() -> None:
        while True:
            used = resident_bytes()
            if used > limit:
                print(f"resources.memory_per_actor: {used / 2**20:.0f} MiB resident, over the limit of "
                      f"{limit / 2**20:.0f} MiB; the process is killed", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(POLL_S)

    thread = threading.Thread(target=watch, name="specray-memory-limit", daemon=True)
    thread.start()
    return thread
