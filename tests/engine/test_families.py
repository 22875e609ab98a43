"""The VLM families people caption with, on the lean decoder, against HF `generate` (float32, one row at a time):
Qwen2-VL, Qwen2.5-VL (multimodal RoPE), Qwen3-VL (interleaved M-RoPE, q/k norm, DeepStack), Gemma 3 (bidirectional
attention within each image, sliding and global layers) and PaliGemma (a bidirectional prefix, 1-based positions).

Each model is a tiny random-weight checkpoint saved with its own processor (benchmarks/family_models.py), and is
first shown to be discriminative: its output differs per row and changes with the image alone, so an exactness
test on it means something. The default run covers batch 7 with and without drafters; `pytest -m full` adds
batch 1 and 32 for every drafter.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.family_models import build_family, build_text_drafter, sample_images
from engine.config import Compression, EngineConfig
from engine.engine import SpecEngine
from engine.processor import encode, load_processor
from engine.request import Request, SamplingParams

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma"]
QUESTIONS = ["What is shown?", "Describe the colours.", "Count the shapes.", "Where is the light?",
             "Read the text.", "Is it day or night?", "What is at the top left?", "Caption this image."]
ROWS, NEW_TOKENS = 32, 12
PARAMS = SamplingParams(max_new_tokens=NEW_TOKENS)
_built: dict[str, dict] = {}


def requests_for(path, images, questions) -> list[Request]:
    processor = load_processor(str(path))
    out = []
    for i, (image, q) in enumerate(zip(images, questions)):
        ids, arrays = encode(processor, q, image)
        out.append(Request(key=str(i), input_ids=ids, model_inputs=arrays))
    return out


@torch.inference_mode()
def hf_greedy(path, requests: list[Request]) -> list[list[int]]:
    """HF generate, one row at a time, float32: the reference (EOS stripped, as the engine reports tokens)."""
    from transformers import AutoModelForImageTextToText

    from engine.model import eos_ids
    from engine.request import stack_arrays

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = load_processor(str(path)).tokenizer
    eos = eos_ids(model.generation_config, tok)
    refs = []
    for r in requests:
        ids = torch.tensor([r.input_ids])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        inputs |= stack_arrays([r.model_inputs], torch.float32, "cpu", len(r.input_ids))
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=sorted(eos),
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)[0, ids.shape[1]:]
        tokens = out.tolist()
        refs.append(tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))])
    return refs


def family(name: str, tmp_path_factory) -> dict:
    """The family's checkpoint, ROWS requests over different images and questions, and HF's outputs for them."""
    if name not in _built:
        path = build_family(name, tmp_path_factory.mktemp(name))
        images = sample_images(ROWS + 1, seed=7)
        requests = requests_for(path, images[:ROWS], [QUESTIONS[i % len(QUESTIONS)] for i in range(ROWS)])
        # row 0's question over another image: the output must change with the image alone
        swapped = requests_for(path, [images[ROWS]], [QUESTIONS[0]])
        refs = hf_greedy(path, requests + swapped)
        _built[name] = {"path": str(path), "requests": requests, "refs": refs[:ROWS], "swapped": refs[ROWS]}
    return _built[name]


def run(f: dict, n: int, drafter: str | None = None, batch: int = 32, **config) -> list:
    engine = SpecEngine(EngineConfig(f["path"], drafter, dtype="float32", max_batch_size=batch, **config))
    results = engine.generate(f["requests"][:n], PARAMS)
    assert all(r.error is None for r in results), [r.error for r in results]
    return results


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_model_is_discriminative(name, tmp_path_factory):
    f = family(name, tmp_path_factory)
    refs = f["refs"]
    assert len({tuple(r) for r in refs}) >= 0.75 * ROWS, "outputs barely depend on the row"
    assert f["swapped"] != refs[0], "the output does not change with the image"
    assert sum(map(len, refs)) >= 3 * ROWS  # rows say something before they stop


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("drafter", [None, "ngram", "text"])
def test_greedy_output_equals_hf_generate_at_batch_7(name, drafter, tmp_path_factory):
    f = family(name, tmp_path_factory)
    spec = drafter
    if drafter == "text":  # a text-only model of the family's own backbone and tokenizer
        spec = str(build_text_drafter(name, f["path"], tmp_path_factory.mktemp(f"{name}-text")))
    # a fixed k: the auto policy rightly stops asking a drafter that proposes nothing (n-gram on random weights)
    results = run(f, 7, spec, batch=7, **({"num_draft_tokens": 4} if drafter else {}))
    assert [r.token_ids for r in results] == f["refs"][:7]
    if drafter is not None:
        assert sum(r.num_drafted_tokens for r in results) > 0


@pytest.mark.full
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("drafter", [None, "ngram", "text"])
@pytest.mark.parametrize("rows,batch", [(7, 1), (ROWS, ROWS)])
def test_greedy_output_equals_hf_generate_at_batch_1_and_32(name, drafter, rows, batch, tmp_path_factory):
    f = family(name, tmp_path_factory)
    spec = drafter
    if drafter == "text":
        spec = str(build_text_drafter(name, f["path"], tmp_path_factory.mktemp(f"{name}-text")))
    results = run(f, rows, spec, batch=batch)
    assert [r.token_ids for r in results] == f["refs"][:rows]


@pytest.mark.parametrize("drafter", ["prefix-vocabulary text", "vlm"])
def test_qwen2_5_vl_with_a_prefix_vocabulary_or_a_vlm_drafter_is_exact(drafter, tmp_path_factory):
    """A text drafter whose vocabulary is a prefix of the target's (Qwen2.5-0.5B under Qwen2.5-VL), and a small
    VLM drafter of the same family, at batch 32 over 32 rows."""
    f = family("qwen2_5_vl", tmp_path_factory)
    if drafter == "vlm":
        spec = build_family("qwen2_5_vl", tmp_path_factory.mktemp("qwen-vlm-drafter"), seed=1)
    else:
        spec = build_text_drafter("qwen2_5_vl", f["path"], tmp_path_factory.mktemp("qwen-prefix"), vocab="prefix")
    results = run(f, ROWS, str(spec), batch=ROWS)
    assert [r.token_ids for r in results] == f["refs"]
    assert sum(r.num_drafted_tokens for r in results) > 0


@torch.inference_mode()
@pytest.mark.parametrize("name,method,tower_layer", [("qwen2_5_vl", "diversity", None),
                                                     ("qwen2_5_vl", "attention", None),
                                                     ("qwen2_5_vl", "diversity", 1), ("qwen2_5_vl", "spread", 0),
                                                     ("qwen2_vl", "diversity", 0)])
def test_pruned_image_tokens_keep_their_three_axis_positions(tmp_path_factory, name, method, tower_layer):
    """Visual-token pruning under M-RoPE: the kept tokens are decoded at their own (t, h, w) positions and the
    text after them at the unpruned prompt's. The engine's prefill logits equal the HF language model's over the
    same kept embeddings at those positions; and speculation over the pruned prompt stays lossless. Pruned
    inside the tower (tower_layer), the kept embeddings are the tower's own output for the kept tokens."""
    f = family(name, tmp_path_factory)
    pruning = Compression(visual_keep=0.5, visual_method=method, visual_tower_layer=tower_layer)
    engine = SpecEngine(EngineConfig(f["path"], None, dtype="float32", compression=pruning))
    target, r = engine.target, f["requests"][0]
    full = target.model.model.get_rope_index(torch.tensor([r.input_ids]),
                                             torch.from_numpy(r.model_inputs["mm_token_type_ids"]),
                                             torch.from_numpy(r.model_inputs["image_grid_thw"]))[0][:, 0].T  # [L, 3]
    pe = target.embed_prompts([r.input_ids], [r.model_inputs])
    n = pe.lengths[0]
    assert n < len(r.input_ids)
    kept = pe.positions[0, :n]  # [n, 3]: a subset of the full prompt's positions, in order, the text unmoved
    rows_of = {tuple(p): i for i, p in enumerate(full.tolist())}
    assert all(tuple(p) in rows_of for p in kept.tolist())
    assert kept[-1].tolist() == full[-1].tolist() and pe.offsets[0] == int(full.max()) + 1 - n
    cache = target.decoder.new_cache()
    cache.allocate(1, n + 4)
    got = target.decoder.logits(target.prefill(cache, pe, last=torch.tensor([n - 1]))[:, 0])
    hf = AutoLanguageModel(f["path"])
    want = hf(pe.embeds[:, :n], kept.T[:, None, :])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if tower_layer is not None:  # the image embeddings the decoder got: the tower's, run on the kept tokens
        from engine.request import stack_arrays

        inputs = stack_arrays([r.model_inputs], torch.float32, "cpu", len(r.input_ids))
        handle = target.pruner.hook()
        try:
            feats = target.model.model.get_image_features(inputs["pixel_values"],
                                                          inputs["image_grid_thw"]).pooler_output[0]
        finally:
            handle.remove()
        image = [tuple(p) for p in full[torch.tensor(r.input_ids) == target.image_token_id].tolist()]
        at = [image.index(tuple(p)) for p in kept.tolist() if tuple(p) in image]
        assert len(at) == round(0.5 * len(image)) and feats[[i for i in range(len(image)) if i not in at]].abs().sum() == 0
        image_rows = [i for i, p in enumerate(kept.tolist()) if tuple(p) in image]
        torch.testing.assert_close(pe.embeds[0, image_rows], feats[at], rtol=1e-5, atol=1e-5)
    pruned = engine.generate(f["requests"][:7], PARAMS)
    engine = SpecEngine(EngineConfig(f["path"], "ngram", dtype="float32", compression=pruning))
    assert [r.token_ids for r in engine.generate(f["requests"][:7], PARAMS)] == [r.token_ids for r in pruned]


class AutoLanguageModel:
    """The HF model's own language model and head over given input embeddings and 3-axis positions."""

    def __init__(self, path: str):
        from transformers import AutoModelForImageTextToText

        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    def __call__(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.model.model.language_model(inputs_embeds=embeds, position_ids=position_ids).last_hidden_state
        return self.model.lm_head(out[:, -1]).float()


def test_a_fallback_that_would_run_gemma3_wrong_is_refused_at_load(tmp_path_factory):
    """The generic decoder cannot give Gemma 3 its bidirectional attention within image tokens: refused at load
    with one line naming the family and the hf backend (before, it ran and half the rows came out wrong)."""
    f = family("gemma3", tmp_path_factory)
    with pytest.raises(ValueError) as e:
        SpecEngine(EngineConfig(f["path"], None, dtype="float32", decoder="hf"))
    message = str(e.value)
    assert "\n" not in message and "gemma3" in message and "decoding.backend: hf" in message


@pytest.mark.parametrize("name", ["gemma3", "paligemma", "qwen2_5_vl"])
def test_the_parity_check_refuses_a_decoder_that_drops_the_models_attention_rule(name, tmp_path_factory, monkeypatch):
    """Reproduce the silent failures: without the bidirectional spans (Gemma 3, PaliGemma) or the 3-axis positions
    (Qwen2.5-VL) the decoder's output differs from HF's; the check at load catches it and names the family and
    the first differing position."""
    import engine.model as model

    f = family(name, tmp_path_factory)
    if name == "qwen2_5_vl":
        monkeypatch.setattr(model, "prompt_positions",
                            lambda ids, n, width, device: torch.arange(width)[None].expand(n, width))
    else:
        monkeypatch.setattr(model, "BLOCK_MASKS", {})
    with pytest.raises(ValueError, match=rf"disagrees with {name}'s own forward at generated position \d"):
        SpecEngine(EngineConfig(f["path"], None, dtype="float32"))
