"""Real checkpoints' dimensions (benchmarks/real_dims.py: the public configs of Qwen2.5-VL-7B, Qwen3-VL-8B,
Gemma-3-4B, InternVL3-1B and SmolVLM-256M, 2 text layers): head_dim 64-256, vocabularies of 49,280-262,208 rows,
mrope_section [16,24,24] and interleaved [24,20,20], Gemma 3's 1,024-token window with a prompt past it, 192-1,280
image tokens per image. The engine at batch 4 (mixed image sizes and prompt lengths) gives HF `generate`'s tokens
(float32, each row alone), on models whose output depends on the image. Several GB each: `pytest -m full`."""
from __future__ import annotations

import pytest
import torch

from benchmarks.real_dims import REAL, build, hf_tokens, images, requests
from engine.config import EngineConfig
from engine.engine import SpecEngine
from engine.request import SamplingParams

NEW_TOKENS = 8


@pytest.mark.full
@pytest.mark.parametrize("name", list(REAL))
def test_real_dimensions_are_token_exact_at_batch_4(name, tmp_path):
    from engine.processor import encode, load_processor
    from engine.request import Request

    path = build(name, tmp_path / name)
    rows = requests(name, path)
    lengths = [len(r.input_ids) for r in rows]
    assert max(lengths) > 1024 and len(set(lengths)) == len(rows)  # past Gemma 3's window; all different
    # row 0's prompt over another of the model's images: the output must change with the image alone
    other = encode(load_processor(str(path)), "What is shown?", images(name)[2])
    refs = hf_tokens(path, rows + [Request(key="swap", input_ids=other[0], model_inputs=other[1])], NEW_TOKENS)
    assert refs[-1] != refs[0] and len({tuple(r) for r in refs[:-1]}) == len(rows), refs
    engine = SpecEngine(EngineConfig(str(path), None, dtype="float32", max_batch_size=len(rows)))
    image_tokens = [int((r.input_ids == engine.target.image_token_id).sum()) for r in rows]
    assert max(image_tokens) >= 256, image_tokens
    assert [r.token_ids for r in engine.generate(rows, SamplingParams(max_new_tokens=NEW_TOKENS))] == refs[:-1]
