"""The compiled decode and verify steps (engine/captured_step.py) against the eager ones: token-exact in float32,
greedy, plain and with a model drafter, at two batch buckets (one of them with a padding row), and compiled once
per bucket (a second call of the same shapes compiles nothing). Inductor on a CPU needs a C++ compiler.

A one-layer random-weight VLM keeps inductor's compiles short; its text weights are drawn wide enough that the
greedy rows differ from each other (a model whose output ignored its input would prove nothing)."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from engine.captured_step import batch_bucket, keys_bucket
from engine.config import EngineConfig
from engine.engine import SpecEngine
from engine.processor import load_processor
from engine.request import SamplingParams
from tests.conftest import TINY
from training.heldout import heldout_requests

pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="inductor compiles C++ on a CPU: no C++ compiler here")

PARAMS = SamplingParams(max_new_tokens=6)
ONE_LAYER = {"vision": TINY["vision"], "text": {**TINY["text"], "num_hidden_layers": 1}}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from training.modelpair import build_processor, build_vlm
    from training.tokenizer import train_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("one-layer-vlm")
    tok = train_tokenizer(num_texts=300)
    vlm = build_vlm(ONE_LAYER, tok)
    with torch.no_grad():
        for name, p in vlm.model.language_model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    vlm.save_pretrained(path)
    build_processor(tok).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def requests(model):
    return heldout_requests(load_processor(model), 3)


def make_engine(model: str, drafter: str | None, compile: str) -> SpecEngine:
    # kv_cache_gb > 0: a cache sized once, 4 slots of the model's 256 positions, so 3 rows run in a bucket of 4
    return SpecEngine(EngineConfig(model, drafter, dtype="float32", max_batch_size=4, kv_cache_gb=0.001,
                                   num_draft_tokens=2, compile=compile, parity_check=False))


def test_buckets():
    assert [batch_bucket(n, 6) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 4, 6, 6]
    assert [keys_bucket(n, 300) for n in (1, 64, 65, 129, 257)] == [64, 64, 128, 256, 300]


@pytest.mark.parametrize("drafter", [False, True], ids=["plain", "model-drafter"])
def test_compiled_steps_are_token_exact_and_compile_once_per_bucket(model, requests, drafter):
    d = model if drafter else None  # the model drafts for itself: the same graphs, found in inductor's cache
    eager, compiled = make_engine(model, d, "off"), make_engine(model, d, "on")
    assert compiled.target_step.enabled and not eager.target_step.enabled
    outputs = []
    for batch in (requests, requests[:1]):  # 3 rows in a bucket of 4 (a padding row in the free slot 3), then 1
        want, got = eager.generate(batch, PARAMS), compiled.generate(batch, PARAMS)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        outputs += [r.token_ids for r in want]
    assert len({tuple(t) for t in outputs[:3]}) > 1, outputs  # the rows differ: the output depends on the input
    assert all(len(t) == PARAMS.max_new_tokens for t in outputs)
    assert {key[0] for key in compiled.target_step.buckets} == {4, 1}
    if drafter:
        assert compiled.stats.drafted > 0 and compiled.drafter.step.enabled and compiled.drafter.step.buckets
    stats = compiled.stats.as_dict()
    buckets = len(compiled.target_step.buckets) + (len(compiled.drafter.step.buckets) if drafter else 0)
    assert stats["compile_buckets"] == buckets and stats["compile_s"] > 0
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # dynamo did compile
    again = compiled.generate(requests, PARAMS)  # the same buckets again: nothing compiles
    assert [r.token_ids for r in again] == outputs[:3]
    assert counters["stats"]["unique_graphs"] == graphs and compiled.stats.compile_buckets == buckets


def test_compiled_rounds_read_back_once(monkeypatch, model, requests):
    """The compiled path adds no read of a device value (tests/engine/test_readbacks.py's count): picking a bucket
    and padding use the host's own numbers."""
    from tests.engine.test_readbacks import rounds_reads

    engine = make_engine(model, model, "on")
    params = SamplingParams(max_new_tokens=12)
    engine.generate(requests, params)  # compiled before the count
    graphs = counters["stats"]["unique_graphs"]
    per_round, reads = rounds_reads(monkeypatch, requests, params, model, engine)
    assert len(per_round) >= 4 and engine.target_step.buckets and counters["stats"]["unique_graphs"] == graphs
    assert max(per_round) == 1, (per_round, reads.reads)
