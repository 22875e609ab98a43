"""The line protocol between benchmarks/peers.py and a peer engine's worker in its own venv (benchmarks/peer_vllm.py,
benchmarks/peer_openvino.py): one JSON object a line each way.

    {"load": {...}} -> load's reply;  {"run": {...}} -> run's reply;  {"quit": true} (or end of input) -> exit
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable


def serve(load: Callable[[dict], dict], run: Callable[[dict], dict]) -> None:
    """Answer the driver until it quits. The replies get the process's stdout to themselves: everything else
    printed (by this process, the engine, or the engine's own subprocesses) goes to stderr."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        msg = json.loads(line)
        if "load" in msg:
            reply = load(msg["load"])
        elif "run" in msg:
            reply = run(msg["run"])
        else:
            break
        out.write(json.dumps(reply) + "\n")
        out.flush()
