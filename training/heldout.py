"""The held-out rows: engine Requests built from the synthetic corpus's test split (or another seed no split
draws from), encoded as the pipeline encodes a row. The model card's evaluations, the benchmarks and the tests
measure on them."""
from __future__ import annotations

import numpy as np

from engine.processor import encode
from engine.request import Request
from scenes import corpus

TEST_SEED = corpus.SPLIT_SEEDS["test"]
FRESH_SEED = 7000  # a held-out stream that no split (nor the demo data) draws from


def heldout_requests(processor, n: int, start: int = 0, task: str | None = None, seed: int = TEST_SEED) -> list:
    """n engine Requests from the test split (or another held-out seed; a mix of tasks unless `task` is given),
    one image each."""
    out = []
    for i in range(start, start + n):
        s = corpus.sample(seed, i, task)
        ids, arrays = encode(processor, s.question, s.image)  # as the pipeline encodes a row
        arrays["pixel_values"] = arrays["pixel_values"].astype(np.float32)
        out.append(Request(key=s.key, input_ids=ids, model_inputs=arrays))
    return out
