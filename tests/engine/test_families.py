"""The VLM families people caption with, on the specray engine, against HF `generate` (float32, one row at a time):
LLaVA, LLaVA-NeXT and LLaVA-OneVision (tiled images), Idefics3 and SmolVLM (image splitting), InternVL, Aya Vision
(Cohere2 text: the fallback decoder), Mistral3 (Pixtral images of their own size), Qwen2-VL, Qwen2.5-VL (multimodal
RoPE), Qwen3-VL (interleaved M-RoPE, q/k norm, DeepStack), Gemma 3 (bidirectional attention within each image,
sliding and global layers) and PaliGemma (a bidirectional prefix, 1-based positions).

Each model is a tiny random-weight checkpoint saved with its own processor (benchmarks/family_models.py), and is
first shown to be discriminative: its output differs per row and changes with the image alone, so an exactness
test on it means something. The default run covers batch 7 with and without drafters, an oracle drafter whose
drafts are about half accepted (partial rollbacks, rows ending on EOS) and sampled runs; `pytest -m full` adds
batch 1 and 32 for every drafter.
"""
from __future__ import annotations

import collections
import hashlib
import json
import random
import shutil

import numpy as np
import pytest
import torch

from benchmarks.family_models import build_family, build_text_drafter, sample_images
from benchmarks.real_dims import hf_tokens
from engine.config import Compression, EngineConfig
from engine.local_drafter import LocalDrafter
from engine.engine import SpecEngine
from engine.processor import encode, load_processor
from engine.request import Request, SamplingParams

FAMILIES = ["llava", "llava_next", "llava_onevision", "idefics3", "smolvlm", "internvl", "aya_vision", "mistral3",
            "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma"]
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


def hf_greedy(path, requests: list[Request], with_eos: bool = False) -> list[list[int]]:
    """HF generate, one row at a time, float32: the reference (EOS stripped, as the engine reports tokens; kept
    with `with_eos`)."""
    return hf_tokens(path, requests, NEW_TOKENS, with_eos)


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


def row_key(ids: list[int], arrays: dict) -> str:
    """A row's identity as a drafter sees it at admission: its prompt ids and image tensors."""
    h = hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes())
    for k in sorted(arrays):
        h.update(k.encode() + np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


class OracleDrafter(LocalDrafter):
    """Proposes the target's own continuation of each row (HF's greedy tokens, the EOS included where the row
    stops on it), with a seeded fraction `corrupt` of the proposed tokens replaced by another token the target
    emits: about half the drafted tokens are accepted, and many rounds end in a partial acceptance that the
    engine must roll back. It counts the rounds by outcome."""

    def __init__(self, continuations: dict[str, list[int]], corrupt: float = 0.25, seed: int = 0):
        self.continuations, self.corrupt, self.salt = continuations, corrupt, seed
        self.pool = sorted({t for c in continuations.values() for t in c})
        self.rows: list[str | None] = []
        self.last: list[int] = []
        self.rounds = collections.Counter()  # "all accepted" | "partial" | "none accepted"

    def allocate(self, slots, max_len):
        self.rows = [None] * slots

    def seed(self, seed):
        pass

    def admit(self, first, prompts, arrays):
        for i, (ids, a) in enumerate(zip(prompts, arrays)):
            self.rows[first + i] = row_key(ids, a or {})

    def propose(self, histories, k, params):
        drafts = torch.zeros(len(histories), k, dtype=torch.long)
        num = torch.zeros(len(histories), dtype=torch.long)
        for i, h in enumerate(histories):
            key = self.rows[i]
            for j, t in enumerate(self.continuations[key][len(h):len(h) + k]):
                rng = random.Random(f"{self.salt}:{key}:{len(h) + j}")
                drafts[i, j] = rng.choice([u for u in self.pool if u != t]) if rng.random() < self.corrupt else t
                num[i] = j + 1
        self.last = num.tolist()
        return drafts, num, None

    def commit(self, accepted):
        for a, m in zip(accepted, self.last):
            if m:
                self.rounds["all accepted" if a == m else "partial" if a else "none accepted"] += 1

    def move(self, src, dst):
        for s_, d in zip(src, dst):
            self.rows[d] = self.rows[s_]

    def fork(self):
        return self


EOS_ROWS = 16


def extra_eos(refs: list[list[int]], lo: int = 4, most: int = 6) -> list[int]:
    """Tokens to end rows on: ones the rows emit, never before position `lo` of any row, taken most frequent
    first while they end at most `most` rows early."""
    first: dict[int, int] = {}  # token -> its earliest position in any row
    for r in refs:
        for i, t in enumerate(r):
            first[t] = min(first.get(t, i), i)
    counts = collections.Counter(t for r in refs for t in set(r) if first[t] >= lo)
    chosen: list[int] = []
    for t, _ in counts.most_common():
        if sum(any(u in chosen + [t] for u in r) for r in refs) <= most:
            chosen.append(t)
    return chosen


def with_eos(name: str, tmp_path_factory) -> dict:
    """The family's checkpoint, copied with more EOS ids in its generation config (tokens its rows emit, from
    their fifth token on): HF's outputs for EOS_ROWS rows then stop on them in some rows."""
    f = family(name, tmp_path_factory)
    if "eos" not in f:
        path = tmp_path_factory.mktemp(f"{name}-eos") / "model"
        shutil.copytree(f["path"], path)
        config = json.loads((path / "generation_config.json").read_text())
        eos = config["eos_token_id"]
        config["eos_token_id"] = (eos if isinstance(eos, list) else [eos]) + extra_eos(f["refs"][:EOS_ROWS])
        (path / "generation_config.json").write_text(json.dumps(config))
        requests = f["requests"][:EOS_ROWS]
        full = hf_greedy(path, requests, with_eos=True)
        eos = set(config["eos_token_id"])
        f["eos"] = {"path": str(path), "requests": requests, "refs": [c[:-1] if c and c[-1] in eos else c for c in full],
                    "continuations": {row_key(r.input_ids, r.model_inputs): c for r, c in zip(requests, full)}}
    return f["eos"]


@pytest.mark.parametrize("name", FAMILIES)
def test_oracle_drafts_are_half_accepted_and_partial_rollbacks_stay_exact(name, tmp_path_factory):
    """Drafts the target mostly accepts: the engine's output is still HF's token for token, at batch 8 over 16
    rows (slots refilled), with rows ending on EOS, about half the drafted tokens accepted, and many rounds
    rolled back after a partial acceptance."""
    e = with_eos(name, tmp_path_factory)
    stopped = sum(len(r) < NEW_TOKENS for r in e["refs"])
    assert 3 <= stopped <= EOS_ROWS - 3, stopped  # rows that end on EOS, and rows that run to max_new_tokens
    engine = SpecEngine(EngineConfig(e["path"], None, dtype="float32", max_batch_size=8, num_draft_tokens=4))
    engine.drafter = oracle = OracleDrafter(e["continuations"])
    results = engine.generate(e["requests"], PARAMS)
    assert [r.token_ids for r in results] == e["refs"]
    assert [r.finish_reason for r in results] == ["stop" if len(r) < NEW_TOKENS else "length" for r in e["refs"]]
    st = engine.stats
    assert st.accepted >= 0.3 * st.drafted and st.drafted >= 100, (st.accepted, st.drafted)
    assert oracle.rounds["partial"] >= 10 and oracle.rounds["all accepted"] >= 5, oracle.rounds
    assert oracle.rounds["none accepted"] >= 3, oracle.rounds
    print(name, f"accepted {st.accepted}/{st.drafted}", dict(oracle.rounds), f"{stopped} rows end on EOS")


@torch.inference_mode()
@pytest.mark.parametrize("name", FAMILIES)
def test_sampled_with_oracle_drafts(name, tmp_path_factory):
    """Sampling through speculation (rejection sampling, residual resampling, rollback). With top_k=1 the target's
    distribution is one point, so the sampled output must be HF's greedy token for token, whatever the drafts.
    With temperature 1 and top_k=3: the same seed gives the same rows, another seed other rows, and every sampled
    token is one of the target's 3 most likely at its position by HF's own forward over the sampled row."""
    from transformers import AutoModelForImageTextToText

    from engine.request import stack_arrays

    e = with_eos(name, tmp_path_factory)
    requests = e["requests"][:8]

    def sample(params):
        engine = SpecEngine(EngineConfig(e["path"], None, dtype="float32", max_batch_size=8, num_draft_tokens=4))
        engine.drafter = oracle = OracleDrafter(e["continuations"])
        return [r.token_ids for r in engine.generate(requests, params)], engine.stats, oracle

    point, st, oracle = sample(SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=1, seed=3))
    assert point == e["refs"][:8]
    assert st.accepted >= 0.3 * st.drafted and oracle.rounds["partial"] >= 3, (st.accepted, st.drafted)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=3, seed=5)
    first = sample(params)[0]  # the oracle's drafts are the greedy rows': mostly rejected once a row departs
    assert first == sample(params)[0]
    assert first != sample(SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=3, seed=6))[0]
    assert first != e["refs"][:8]
    model = AutoModelForImageTextToText.from_pretrained(e["path"], dtype=torch.float32).eval()
    for r, out in zip(requests, first):  # HF's own generate, forced to the sampled tokens, its logits at each
        if not out:
            continue  # the row's first token was an EOS
        ids = torch.tensor([r.input_ids])
        inputs = stack_arrays([r.model_inputs], torch.float32, "cpu", ids.shape[1])
        forced = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs, do_sample=False,
                                max_new_tokens=len(out), logits_processor=[Forced(out, ids.shape[1])],
                                output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        assert forced.sequences[0, ids.shape[1]:].tolist() == out
        top3 = torch.cat(forced.logits).topk(3, -1).indices
        assert all(t in top3[i].tolist() for i, t in enumerate(out)), (name, out, top3.tolist())


class Forced:
    """A logits processor that makes generate emit `tokens` (the raw logits are still returned)."""

    def __init__(self, tokens: list[int], prompt_len: int):
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -float("inf"))
        out[:, self.tokens[input_ids.shape[1] - self.prompt_len]] = 0
        return out


def planted(kind: str):
    """LeanDecoder.forward with a bug in the rotary positions of the tokens after the prompt: "batch max" (every
    row at the batch's largest position: right at batch 1, wrong in every shorter row of a batch) or "rope +1"."""
    from engine.decoder import LeanDecoder

    forward = LeanDecoder.forward

    def wrong(self, cache, x, starts, first=0, *args, positions=None, **kwargs):
        if positions is None:
            n, t, _ = x.shape
            rp = starts[:, None] + torch.arange(t)[None] + cache.rope_offset[first:first + n, None]
            positions = rp.amax(0, keepdim=True).expand_as(rp) if kind == "batch max" else rp + 1
        return forward(self, cache, x, starts, first, *args, positions=positions, **kwargs)

    return wrong


@pytest.mark.parametrize("name", ["qwen3_vl", "gemma3", "llava_next"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_parity_check_catches_a_batch_only_bug_and_a_rope_offset(name, dtype, tmp_path_factory, monkeypatch):
    """The check runs two rows of different prompt lengths and image sizes as one batch, 8 tokens each: the
    correct decoder passes in float32 and bfloat16 (its cost and figures reported), a decoder putting every row
    at the batch's largest position (invisible at batch 1) is refused, and so is a rope offset of +1."""
    import engine.parity as parity
    from engine.decoder import LeanDecoder
    from engine.model import LoadedModel

    f = family(name, tmp_path_factory)
    ok = SpecEngine(EngineConfig(f["path"], None, dtype=dtype)).target.parity
    assert ok["rows"] == 2 and ok["positions"] == 8 and ok["prompt_tokens"][0] != ok["prompt_tokens"][1]
    assert ok["seconds"] > 0 and ok["max_rel_rms"] < (parity.REL_RMS.get(getattr(torch, dtype)) or 1e-3)
    monkeypatch.setattr(LeanDecoder, "forward", planted("batch max"))
    m = LoadedModel(f["path"], "cpu", getattr(torch, dtype), learning=True)
    rows, _ = parity.sample_inputs(m)
    ref, tokens = parity.reference_logits(m, *rows[1])  # the longer row alone, at batch 1, passes
    assert not parity.compare(ref[None], parity.engine_logits(m, rows[1:], [tokens]), m.dtype)[0].any()
    for kind in ("batch max", "rope +1"):
        monkeypatch.setattr(LeanDecoder, "forward", planted(kind))
        with pytest.raises(ValueError, match=rf"disagrees with {name}'s own forward at generated position \d of row"):
            SpecEngine(EngineConfig(f["path"], None, dtype=dtype))
