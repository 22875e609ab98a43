"""The specray engine against the oracle: `model.generate` through the hf backend, on the shipped model pair.

Greedy output with speculation on is token for token the target's, for every drafter kind and batch size.
Both sides run in float32: the claim is exactness against the same model at the same precision. The default run
uses 128 held-out prompts; `pytest -m full` repeats it on 500.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from engine.local_drafter import LocalDrafter
from engine.ngram_drafter import NgramDrafter
from engine.draft_length import DraftLength, DraftPolicy
from engine.config import EngineConfig
from engine.engine import SpecEngine
from engine.hf_backend import HFBackend
from engine.request import SamplingParams
from tests.conftest import ROOT, chi_square, hf_forward_inputs
from engine.processor import load_processor
from training.heldout import heldout_requests

TARGET = str(ROOT / "models/target")
DRAFTERS = {"vlm": str(ROOT / "models/drafter-vlm"), "text": str(ROOT / "models/drafter-text"), "ngram": "ngram"}
N_PROMPTS, N_FULL = 128, 500
GREEDY = SamplingParams(max_new_tokens=64)


def oracle_rows(n: int):
    torch.set_num_threads(2)
    processor = load_processor(TARGET)
    requests = heldout_requests(processor, n)
    hf = HFBackend(EngineConfig(TARGET, backend="hf", dtype="float32"))
    oracle = []
    for i in range(0, len(requests), 32):
        oracle += hf.generate(requests[i:i + 32], GREEDY)
    return requests, oracle


@pytest.fixture(scope="module")
def heldout():
    return oracle_rows(N_PROMPTS)


@pytest.fixture(scope="module")
def heldout_full():
    return oracle_rows(N_FULL)


def _same(results, oracle):
    bad = [i for i, (r, o) in enumerate(zip(results, oracle))
           if (r.text, r.num_output_tokens, r.finish_reason) != (o.text, o.num_output_tokens, o.finish_reason)]
    return bad, [(oracle[i].text, results[i].text) for i in bad[:3]]


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
def test_greedy_speculation_is_identical_to_hf_generate(heldout, drafter):
    check_greedy_speculation(*heldout, drafter)


@pytest.mark.full
@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
def test_greedy_speculation_is_identical_to_hf_generate_on_500_prompts(heldout_full, drafter):
    check_greedy_speculation(*heldout_full, drafter)


def check_greedy_speculation(requests, oracle, drafter):
    engine = SpecEngine(EngineConfig(TARGET, DRAFTERS[drafter], dtype="float32", num_draft_tokens=4))
    for batch in (1, 7, 32):
        engine.max_batch = batch
        before = engine.stats.drafted
        results = engine.generate(requests, GREEDY)
        bad, examples = _same(results, oracle)
        assert not bad, f"{drafter} batch {batch}: {len(bad)} rows differ, e.g. {examples}"
        assert engine.stats.drafted > before
    if drafter != "ngram":  # a trained drafter is mostly right; speculation must actually be happening
        assert engine.stats.accepted / engine.stats.drafted > 0.4
        assert sum(r.num_accepted_tokens for r in results) > 0


def test_plain_decoding_and_the_generic_hf_decoder_are_identical_too(heldout):
    requests, oracle = heldout
    plain = SpecEngine(EngineConfig(TARGET, None, dtype="float32", max_batch_size=16))
    bad, examples = _same(plain.generate(requests, GREEDY), oracle)
    assert not bad, examples
    generic = SpecEngine(EngineConfig(TARGET, DRAFTERS["vlm"], dtype="float32", max_batch_size=8, decoder="hf"))
    assert not generic.target.lean
    bad, examples = _same(generic.generate(requests[:24], GREEDY), oracle[:24])
    assert not bad, examples


def test_continuous_batching_refills_free_slots(heldout):
    requests, oracle = heldout
    engine = SpecEngine(EngineConfig(TARGET, DRAFTERS["vlm"], dtype="float32", max_batch_size=8, num_draft_tokens=4))
    results = engine.generate(requests[:64], GREEDY)
    assert not _same(results, oracle[:64])[0]
    st = engine.stats
    # rows finish at different rounds; refilled slots keep the batch near full until the queue runs dry
    assert st.row_rounds / st.rounds > 6.0
    assert st.rounds < sum(r.num_output_tokens + 1 for r in results) / 8 + 20


def test_stop_strings_and_max_new_tokens(heldout):
    requests, oracle = heldout
    engine = SpecEngine(EngineConfig(TARGET, DRAFTERS["vlm"], dtype="float32", max_batch_size=8, num_draft_tokens=4))
    hf = HFBackend(EngineConfig(TARGET, backend="hf", dtype="float32"))
    long_rows = [r for r, o in zip(requests, oracle) if o.num_output_tokens >= 8][:16]
    for params in (SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=64, stop=[" is", "."])):
        got, want = engine.generate(long_rows, params), hf.generate(long_rows, params)
        assert [(g.text, g.finish_reason) for g in got] == [(w.text, w.finish_reason) for w in want]
    assert all(g.num_output_tokens == 3 for g in engine.generate(long_rows, SamplingParams(max_new_tokens=3)))


class FlatDrafter(LocalDrafter):
    """A deliberately wrong drafter: proposes uniformly from a fixed set of tokens. The acceptance rule must undo it."""

    def __init__(self, support: torch.Tensor):
        self.q = support.float() / support.sum()
        self.g = torch.Generator().manual_seed(7)

    def allocate(self, slots, max_len): pass
    def seed(self, seed): pass
    def admit(self, first, prompts, arrays): pass
    def commit(self, accepted): pass
    def move(self, src, dst): pass

    def propose(self, histories, k, params):
        n = len(histories)
        drafts = torch.multinomial(self.q, n * k, replacement=True, generator=self.g).view(n, k)
        return drafts, torch.full((n,), k), self.q.expand(n, k, -1).contiguous()


def test_sampling_with_speculation_keeps_the_targets_distribution(heldout):
    """The third sampled token, after the most likely two-token start, has exactly the target's (temperature, top-k,
    top-p warped) distribution, computed with transformers' own warpers, although a drafter proposed it flat over
    that distribution's support (so acceptance and the residual resampling both matter)."""
    from transformers import AutoModelForImageTextToText
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    requests, _ = heldout
    prompt = requests[0]
    params = SamplingParams(max_new_tokens=3, temperature=3.0, top_k=40, top_p=0.97, seed=1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(3.0), TopKLogitsWarper(40), TopPLogitsWarper(0.97)])
    model = AutoModelForImageTextToText.from_pretrained(TARGET, dtype=torch.float32)

    def target_probs(ids):
        logits = model(**hf_forward_inputs(prompt, ids)).logits[:, -1].float()
        return torch.softmax(warpers(torch.from_numpy(np.asarray(ids, np.int64))[None], logits), -1)[0]

    with torch.inference_mode():
        t1 = target_probs(prompt.input_ids).argmax().item()
        start = [t1, target_probs([*prompt.input_ids, t1]).argmax().item()]
        p = target_probs([*prompt.input_ids, *start])
    engine = SpecEngine(EngineConfig(TARGET, None, dtype="float32", max_batch_size=128, num_draft_tokens=2))
    engine.drafter = FlatDrafter(p > 0)
    results = engine.generate([prompt] * 1500, params)
    seconds = torch.tensor([r.token_ids[2] for r in results if r.token_ids[:2] == start and len(r.token_ids) == 3])
    counts = torch.bincount(seconds, minlength=len(p)).double()
    assert counts[p == 0].sum() == 0  # nothing outside the warped support
    stat, p_value, tested = chi_square(seconds, p)
    assert len(seconds) >= 300 and tested >= 4, (len(seconds), tested)  # enough rows took the start to test
    assert p_value > 1e-4, (stat, p_value)
    assert 0 < engine.stats.accepted < engine.stats.drafted


def test_the_target_drafting_for_itself_has_every_draft_accepted():
    """A drafter is allowed to propose EOS (the shipped pair's <|im_end|>) but never a vision span's tokens
    (<|vision_start|>, <|vision_end|>: placeholders the model reads, never writes), or every row's last round is
    rejected. The target as its own drafter proposes exactly what it then verifies."""
    from engine.drafter import target_vocab

    engine = SpecEngine(EngineConfig(TARGET, TARGET, dtype="float32", max_batch_size=6, num_draft_tokens=3))
    tok, config = engine.target.tokenizer, engine.target.model.config
    banned = target_vocab(tok, engine.target.image_token_id, engine.target).banned
    assert tok.eos_token_id not in banned
    assert {config.vision_start_token_id, config.vision_end_token_id, config.image_token_id} <= banned
    out = engine.generate(heldout_requests(load_processor(TARGET), 6), SamplingParams(max_new_tokens=32))
    assert all(r.num_output_tokens > 3 for r in out)
    assert engine.stats.drafted > 0 and engine.stats.accepted == engine.stats.drafted


def test_ngram_drafter_proposes_continuations_and_never_image_tokens():
    d = NgramDrafter(image_token_id=4)
    d.allocate(2, 64)
    d.admit(0, [[1, 4, 4, 4, 7, 8, 9, 7, 8], [1, 4, 4, 10, 11]], [{}, {}])
    drafts, num, q = d.propose([[4, 5], [12]], 3, GREEDY)
    # row 0: history (image tokens dropped) 1 7 8 9 7 8 4 5: "5" never occurred before, no proposal
    assert num.tolist() == [0, 0] and q is None
    drafts, num, _ = d.propose([[7, 8], [10]], 3, GREEDY)
    # row 0: 1 7 8 9 7 8 | 7 8: no earlier "8 7 8"; the latest earlier "7 8" is followed by "7 8" (then the end)
    assert num.tolist()[0] == 2 and drafts[0, :2].tolist() == [7, 8]
    assert num.tolist()[1] == 2 and drafts[1, :2].tolist() == [11, 10]
    # an image token in the history (the target emitted one) is never proposed: the proposal stops before it
    d.admit(0, [[1, 4, 20, 21]], [{}])
    drafts, num, _ = d.propose([[22, 4, 23, 20]], 4, GREEDY)
    assert num.tolist() == [2] and drafts[0, :2].tolist() == [21, 22]


def test_a_drafter_that_proposes_nothing_is_soon_not_asked():
    """An n-gram drafter that finds no match proposes no token: each such round still pays for k verify positions,
    so those rows count as failures, acceptance falls to zero and the policy decodes plainly (k = 0)."""
    policy = DraftLength(None, max_k=8)
    ks = []
    for _ in range(64):
        k = policy.choose()
        ks.append(k)
        policy.record(k, 0.010 + 0.002 * k, 0.0, [0] * 16, [0] * 16, rows=16)
    assert ks[-32:].count(0) >= 28, ks


def test_adaptive_draft_length_follows_acceptance_and_cost():
    def simulate(acceptance: float, draft_step: float, rounds: int = 80) -> list[int]:
        rng = np.random.default_rng(0)
        policy = DraftLength(None, max_k=8)
        for _ in range(rounds):
            k = policy.choose()
            verify = 0.010 + 0.001 * k
            accepted = [int(min(k, rng.geometric(1 - acceptance) - 1)) for _ in range(16)] if k else [0] * 16
            policy.record(k, verify, draft_step * k, accepted, [k] * 16)
        return policy.history[-20:]

    assert np.mean(simulate(0.9, 0.0005)) >= 5  # a good, cheap drafter: draft long
    assert 1 <= np.mean(simulate(0.6, 0.0010)) <= 4  # a mediocre one: draft short
    tail = simulate(0.1, 0.004)  # a useless, costly one: plain decoding (with occasional probes)
    assert sum(k == 0 for k in tail) >= 17


def test_the_cost_model_weighs_the_drafters_prefill_against_what_speculation_saves_per_row():
    def trained(prefill_row_s: float) -> DraftLength:
        policy = DraftLength(None, max_k=8)
        for _ in range(40):
            k = policy.choose()
            accepted = [min(k, 3)] * 16  # acceptance about 0.75
            policy.record(k, 0.010 + 0.001 * k, 0.0005 * k, accepted, [k] * 16, rows=16)
        policy.record_finished([30] * 16)
        policy.record_prefill(16, 16 * prefill_row_s)
        return policy

    saving = trained(0.0).saving_per_row()
    # plain: 30 tokens x 10 ms / 16 rows; speculating saves about half of that per row
    assert 0.3 * 30 * 0.010 / 16 < saving < 0.8 * 30 * 0.010 / 16, saving
    assert trained(0.5 * saving).pays() and not trained(2 * saving).pays()
    off = trained(2 * saving)
    calls = [off.use_drafter() for _ in range(16)]  # off, but one call in probe_every probes again
    assert sum(calls) == 16 // off.probe_every and calls[off.probe_every - 1]
    assert DraftLength(4).pays()  # a fixed k is the user's order


def test_the_row_length_is_not_judged_by_the_short_rows_that_finish_first():
    """Half a batch stops after 2 tokens, half runs to 30: while the long half decodes, each of its rows counts as
    long as it may get (64), so a drafter that pays over the whole batch is kept; once all finished, the mean is
    exact. (A mean over the finished rows alone, 2 tokens, switched off the shipped VLM drafter at batch 16.)"""
    policy = DraftLength(None, max_k=8)
    for _ in range(10):
        k = policy.choose()
        policy.record(k, 0.010 + 0.001 * k, 0.0005 * k, [min(k, 3)] * 16, [k] * 16, rows=16)
    policy.record_finished([2] * 8, live_rows=8, limit=64)
    assert policy.row_tokens == (8 * 2 + 8 * 64) / 16
    per_token = policy.saving_per_row() / policy.row_tokens
    policy.record_prefill(16, 16 * per_token * 10)  # pays over a 16-token row, not over a 2-token one
    assert policy.pays()
    policy.record_finished([30] * 8, live_rows=0, limit=64)
    assert policy.row_tokens == 16 and policy.pays()
    policy.record_finished([2] * 16)  # a batch of short answers after it: now it does not pay
    assert policy.row_tokens == (16 * 16 + 16 * 2) / 32 and not policy.pays()


def test_the_engine_tells_the_policy_how_many_rows_are_still_decoding(heldout):
    requests, _ = heldout
    engine = SpecEngine(EngineConfig(TARGET, DRAFTERS["vlm"], dtype="float32", max_batch_size=8))
    seen = []
    record = engine.policy.record_finished
    engine.policy.record_finished = lambda tokens, live, limit: (seen.append((len(tokens), live, limit)),
                                                                 record(tokens, live, limit))
    engine.generate(requests[:12], GREEDY)
    assert sum(n for n, _, _ in seen) == 12 and seen[-1][1] == 0
    assert any(live for _, live, _ in seen) and {limit for _, _, limit in seen} == {GREEDY.max_new_tokens}
    assert engine.policy.done_rows == 12


def test_a_drafter_whose_prefill_cannot_pay_is_turned_off_and_the_output_stays_the_targets(heldout):
    """A drafter made slow on purpose (its prefill sleeps 0.3 s a row): within the first call the engine stops
    admitting rows to it, the next call decodes plainly from the start; after new drafter weights a call probes
    it for a few rounds and stops again; and every row equals HF generate's."""
    requests, oracle = heldout
    engine = SpecEngine(EngineConfig(TARGET, DRAFTERS["vlm"], dtype="float32", max_batch_size=8))
    admit = engine.drafter.admit
    admitted = []

    def slow_admit(first, prompts, arrays):
        time.sleep(0.3 * len(prompts))
        admitted.append(len(prompts))
        admit(first, prompts, arrays)

    engine.drafter.admit = slow_admit
    first = engine.generate(requests[:24], GREEDY)
    assert not engine.policy.pays() and sum(admitted) < 24, admitted
    drafted, rows = engine.stats.drafted, sum(admitted)
    second = engine.generate(requests[24:48], GREEDY)
    assert engine.stats.drafted == drafted and sum(admitted) == rows
    assert engine.stats.drafter_prefill_s >= 0.3 * rows
    engine.policy.drafter_changed()  # new weights (a drafter that learns): the next probing call measures them...
    engine.policy.calls = engine.policy.probe_every - 1
    third = engine.generate(requests[48:72], GREEDY)
    assert engine.stats.drafted > drafted and rows < sum(admitted) < rows + 24, admitted  # ...and stops again
    assert not _same(first + second + third, oracle[:72])[0]


def test_a_prompt_too_long_for_the_model_is_an_error_row_not_a_failed_batch(heldout):
    requests, oracle = heldout
    engine = SpecEngine(EngineConfig(TARGET, DRAFTERS["vlm"], dtype="float32", max_batch_size=4))
    too_long = dataclasses.replace(requests[1], input_ids=np.concatenate([requests[1].input_ids, [10] * 250]))
    results = engine.generate([requests[0], too_long, requests[2]], GREEDY)
    assert results[1].finish_reason == "error" and "256 positions" in results[1].error
    assert [results[0].text, results[2].text] == [oracle[0].text, oracle[2].text]


def test_orders_reach_the_engine_between_rounds_only(heldout):
    """A host's new orders (here: k) are applied by `between_rounds`, which the engine calls before every round (the
    policy is never asked to fetch them inside one); every draft requested after the order has the new k, and the
    output stays the target's."""
    requests, oracle = heldout
    events: list[tuple] = []

    class Ordered(DraftPolicy):
        max_k, k = 4, 2

        def choose(self):
            events.append(("choose", self.k))
            return self.k

        def record(self, k, verify_s, draft_s, accepted, num_drafts, rows=0):
            events.append(("round", k))

    policy = Ordered()

    def between_rounds():
        events.append(("between",))
        if sum(e[0] == "round" for e in events) == 5:
            policy.k = 4  # the order arrives after the fifth round

    engine = SpecEngine(EngineConfig(TARGET, DRAFTERS["vlm"], dtype="float32", max_batch_size=8))
    results = engine.generate(requests[:16], GREEDY, policy=policy, between_rounds=between_rounds)
    assert not _same(results, oracle[:16])[0]
    rounds = [e[1] for e in events if e[0] == "round"]
    assert rounds[:5] == [2] * 5 and set(rounds[6:]) == {4}  # the draft in flight at the order keeps its k
    # one group: a chance to apply orders before each of its rounds (never two rounds without one)
    marks = [e[0] for e in events if e[0] in ("between", "round")]
    assert marks[0] == "between" and all(a != b for a, b in zip(marks, marks[1:]) if b == "round"), marks


@pytest.mark.parametrize("drafter", [None, "vlm"])
def test_prefill_in_chunks_is_identical(heldout, drafter, monkeypatch):
    """Rows admitted together are prefilled in chunks of PREFILL_TOKENS prompt tokens: at about two rows a chunk
    (each prompt has about 50 tokens) the output is still the oracle's, with and without a drafter."""
    from engine import scheduler
    from engine.sequence import Sequence

    requests, oracle = heldout
    monkeypatch.setattr(scheduler, "PREFILL_TOKENS", 120)
    chunks = scheduler.prefill_chunks([Sequence(i, r, len(r.input_ids)) for i, r in enumerate(requests[:32])])
    assert len(chunks) >= 12 and sum(map(len, chunks)) == 32
    engine = SpecEngine(EngineConfig(TARGET, DRAFTERS.get(drafter), dtype="float32", max_batch_size=32,
                                     num_draft_tokens=4 if drafter else "auto"))
    bad, examples = _same(engine.generate(requests[:48], GREEDY), oracle[:48])
    assert not bad, examples


def test_a_kv_cache_sized_once_from_its_budget(heldout):
    """decoding.kv_cache_gb: the target's cache is allocated once (never grown by later calls), every slot gets the
    positions the budget allows, the output is the same, and a row that does not fit gets an error naming it."""
    requests, oracle = heldout
    engine = SpecEngine(EngineConfig(TARGET, DRAFTERS["vlm"], dtype="float32", max_batch_size=16, kv_cache_gb=0.02))
    per_token = engine.target.decoder.new_cache().bytes_per_token
    positions = int(0.02e9 // (16 * per_token))
    out = engine.generate(requests[:24], GREEDY)
    cache = engine._caches[0]
    assert (cache.slots, cache.max_len) == (16, positions)
    tensors = [t.data_ptr() for t in cache.k]
    assert _same(out, oracle[:24])[0] == []
    engine.generate(requests[24:40], dataclasses.replace(GREEDY, max_new_tokens=positions // 2))
    assert [t.data_ptr() for t in cache.k] == tensors  # a longer call: the same tensors
    too_long = engine.generate(requests[:1], dataclasses.replace(GREEDY, max_new_tokens=positions))
    assert too_long[0].finish_reason == "error" and "kv_cache_gb" in too_long[0].error
