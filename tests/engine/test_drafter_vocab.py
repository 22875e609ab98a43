"""Drafters across vocabularies: a drafter whose tokenizer is a prefix of the target's (the target appends tokens,
and either embedding carries padding rows) drafts losslessly; one with another tokenizer is refused; no drafter
ever proposes a banned id (padding rows, ids the target lacks, placeholders, special tokens but EOS).

Tiny random Llama models: the drafter is the target's own weights cut to its smaller vocabulary, so it agrees
with the target wherever the target picks a token the drafter may propose."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

from engine.config import EngineConfig
from engine.drafter import make_drafter
from engine.engine import SpecEngine
from engine.request import Request, SamplingParams
from engine.speculative import fit_width
from scenes import corpus
from training.modelpair import build_text_lm
from training.tokenizer import train_tokenizer

TEXT = {"text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128, "initializer_range": 0.3}}
TARGET_PADDING, DRAFTER_PADDING = 13, 3  # embedding rows past each tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target dir, drafter dir, target tokenizer, drafter tokenizer): the target's tokenizer is the drafter's plus
    `<video>` (a plain added token its config names as video_token_id) and `<ctl>` (an added special token)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vocab")
    tok_d = train_tokenizer(num_texts=300)
    tok_t = copy.deepcopy(tok_d)
    tok_t.add_tokens(["<video>"])
    tok_t.add_tokens([AddedToken("<ctl>", special=True)], special_tokens=True)
    target = build_text_lm(TEXT, tok_t)
    target.resize_token_embeddings(len(tok_t) + TARGET_PADDING)
    video = target.config.video_token_id = tok_t.convert_tokens_to_ids("<video>")
    # the target emits <video> where it would emit its favourite token: tokens the drafter lacks reach its history
    with torch.no_grad():
        ids = torch.tensor([_requests(tok_t, 1)[0].input_ids])
        out = target.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
        emb = target.get_input_embeddings().weight
        emb[video] = 1.1 * emb[out.mode().values]
    drafter = build_text_lm(TEXT, tok_d)
    drafter.resize_token_embeddings(len(tok_d) + DRAFTER_PADDING)
    state = target.state_dict()
    rows = drafter.config.vocab_size
    drafter.load_state_dict({k: v[:rows] if v.shape[0] == target.config.vocab_size else v for k, v in state.items()})
    for model, tok, name in ((target, tok_t, "target"), (drafter, tok_d, "drafter")):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return str(root / "target"), str(root / "drafter"), tok_t, tok_d


def _requests(tok, n: int) -> list[Request]:
    texts = [f"USER: {corpus.sample(corpus.SPLIT_SEEDS['train'], i).answer}\nASSISTANT:" for i in range(n)]
    return [Request(str(i), tok(t).input_ids, {}) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def engines(pair):
    torch.set_num_threads(1)  # tiny models: a second thread buys nothing
    target, drafter, _, _ = pair
    plain = SpecEngine(EngineConfig(target, None, dtype="float32", max_batch_size=4))
    spec = SpecEngine(EngineConfig(target, drafter, dtype="float32", max_batch_size=4, num_draft_tokens=3))
    return plain, spec


def test_prefix_vocabulary_drafter_is_lossless_under_greedy(pair, engines):
    _, _, tok_t, tok_d = pair
    plain, spec = engines
    assert spec.drafter.ck.model.config.vocab_size < spec.target.model.config.vocab_size
    requests, params = _requests(tok_t, 6), SamplingParams(max_new_tokens=20)
    want = plain.generate(requests, params)
    got = spec.generate(requests, params)
    assert len({tuple(r.token_ids) for r in want}) == len(want)  # a discriminative model: every row differs
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    video = tok_t.convert_tokens_to_ids("<video>")
    assert any(video in r.token_ids for r in want)  # a token the drafter lacks: its drafts rejected, then fed it
    assert spec.stats.drafted > spec.stats.accepted > 0.3 * spec.stats.drafted


def test_sampling_pads_the_drafters_probabilities_and_is_seeded(pair, engines):
    _, _, tok_t, _ = pair
    _, spec = engines
    requests = _requests(tok_t, 5)
    runs = [spec.generate(requests, SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=s))
            for s in (3, 3, 4)]
    assert [r.token_ids for r in runs[0]] == [r.token_ids for r in runs[1]]
    assert [r.token_ids for r in runs[0]] != [r.token_ids for r in runs[2]]
    assert all(r.finish_reason != "error" for r in runs[0])
    assert sum(r.num_accepted_tokens for run in runs for r in run) > 0


def test_fit_width_pads_with_zeros_and_cuts_banned_columns():
    q = torch.softmax(torch.randn(2, 3, 5), -1)
    padded = fit_width(q, 8)
    assert padded.shape == (2, 3, 8) and torch.equal(padded[..., :5], q) and not padded[..., 5:].any()
    wide = torch.cat([q, torch.zeros(2, 3, 4)], -1)
    assert torch.equal(fit_width(wide, 5), q)
    assert fit_width(q, 5) is q and fit_width(None, 5) is None


def test_a_drafter_with_another_tokenizer_is_refused(pair, tmp_path):
    target, _, _, tok_d = pair
    # the same tokens, two ids swapped
    spec = json.loads(tok_d.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    # a token the target lacks (the target has <video> at that id)
    extra = copy.deepcopy(tok_d)
    extra.add_tokens(["<mine>"])
    for name, tok, expect in (("swapped", swapped, f"(id {min(vocab[a], vocab[b])})"), ("extra", extra, "'<mine>'")):
        path = tmp_path / name
        tok.save_pretrained(path)
        build_text_lm(TEXT, tok).save_pretrained(path)
        with pytest.raises(ValueError) as err:
            SpecEngine(EngineConfig(target, str(path), dtype="float32"))
        msg = str(err.value)
        assert msg.startswith("model.drafter:") and "\n" not in msg, msg
        assert str(path) in msg and target in msg and expect in msg, msg


def test_no_drafter_proposes_a_banned_id(pair, engines, monkeypatch):
    target, _, tok_t, tok_d = pair
    _, spec = engines
    eos, ctl, video = tok_t.eos_token_id, *tok_t.convert_tokens_to_ids(["<ctl>", "<video>"])
    specials = {tok_t.pad_token_id, tok_t.bos_token_id, tok_t.unk_token_id, tok_t.convert_tokens_to_ids("<image>")}
    d = spec.drafter.fork()
    width = d.ck.model.config.vocab_size
    padding = set(range(len(tok_d), width))
    banned = specials | padding
    assert set(d.banned.tolist()) == banned and eos not in banned

    # the drafter's logits favour every banned id, EOS less so: it proposes EOS, the best id it may propose
    bias = torch.zeros(width)
    bias[sorted(banned)] = 1000.0
    bias[eos] = 500.0
    logits = d.dec.logits
    monkeypatch.setattr(d.dec, "logits", lambda h: logits(h) + bias.to(h.device))
    d.allocate(2, 64)
    prompts = [r.input_ids for r in _requests(tok_t, 2)]
    d.admit(0, [prompts[0] + [video, ctl], prompts[1]], [{}, {}])  # the target's own tokens: the drafter lacks them
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=1)):
        drafts, num, q = d.propose([[10, ctl], [video, 11, len(tok_t) + 2]], 4, params)
        assert drafts.tolist() == [[eos] * 4] * 2 and num.tolist() == [4, 4]
        if q is not None:
            assert q.shape[-1] == width and not q[..., sorted(banned)].any()
            assert fit_width(q, spec.target.model.config.vocab_size)[..., len(tok_d):].sum() == 0

    # the n-gram drafter copies from the prompt and the output: it stops before any banned id, never before EOS
    ngram = make_drafter("ngram", tok_t, None, "cpu", torch.float32, target=target)
    assert {ctl, video, tok_t.bos_token_id, tok_t.pad_token_id} <= ngram.banned and eos not in ngram.banned
    ngram.allocate(3, 64)
    ngram.admit(0, [[20, 21, 22, ctl, 23], [20, 21, eos, 24, video], [30, 31, 32, 33]], [{}, {}, {}])
    past = len(tok_t) + 1  # a padding row of the target's (it emitted one)
    drafts, num, _ = ngram.propose([[5, 21, 22], [20, 21], [40, 41, past, 7, 40]], 4, SamplingParams())
    assert num.tolist() == [0, 2, 1] and drafts[1, :2].tolist() == [eos, 24] and drafts[2, 0].item() == 41
