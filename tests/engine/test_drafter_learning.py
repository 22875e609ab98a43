"""A drafter that learns during the job (engine/drafter_learning.py): it learns the target's outputs, its new weights
reach the engine between calls, the output never changes (greedy: token for token; sampling: the target's
distribution), and the learned drafter saves as a model folder that drafts in the next job."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.drafter_learning import DrafterLearner, examples
from engine.engine import SpecEngine
from engine.processor import load_processor
from engine.request import SamplingParams
from tests.conftest import ROOT, chi_square, hf_forward_inputs
from training.heldout import heldout_requests

TARGET, DRAFTER = str(ROOT / "models/target"), str(ROOT / "models/drafter-vlm")
TEXT_DRAFTER = str(ROOT / "models/drafter-text")
GREEDY = SamplingParams(max_new_tokens=32)


@pytest.fixture(scope="module")
def rows():
    torch.set_num_threads(2)
    requests = heldout_requests(load_processor(TARGET), 24)
    engine = SpecEngine(EngineConfig(TARGET, DRAFTER, dtype="float32", drafter_learns=True, capture_topk=8,
                                     num_draft_tokens=4))
    return engine, requests, engine.generate(requests, GREEDY)


def _scrambled(learner: DrafterLearner, seed: int, scale: float = 0.05) -> dict:
    """The learner's weights, perturbed: a drafter that drafts very differently (acceptance collapses)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in learner.state_dict().items()}


def test_examples_carry_the_targets_answer_its_eos_and_its_topk(rows):
    engine, requests, results = rows
    eos = engine.drafter.ck.tokenizer.eos_token_id
    ex = examples(requests, results, eos, images=True)
    assert len(ex) == len(requests)
    for e, r, req in zip(ex, results, requests):
        assert list(e.input_ids) == list(req.input_ids) and "pixel_values" in e.model_inputs
        assert e.output_ids == r.token_ids + ([eos] if r.finish_reason == "stop" else [])
        values, ids = e.topk
        assert values.shape == ids.shape == (len(e.output_ids), 8)
        assert (ids[:, 0] == np.array(e.output_ids)).all()  # greedy: the target's token is its top-1
    text_only = examples(requests, results, eos, images=False)
    assert all(e.model_inputs is None for e in text_only)


@pytest.mark.parametrize("drafter,soft", [(DRAFTER, True), (TEXT_DRAFTER, False)], ids=["vlm-topk", "text-tokens"])
def test_the_learner_lowers_its_loss_on_the_targets_outputs(rows, drafter, soft):
    """A drafter made weak (its weights perturbed) learns the target's answers back: the loss on them falls well
    below where it started."""
    engine, requests, results = rows
    ex = examples(requests, results, engine.drafter.ck.tokenizer.eos_token_id, images=drafter == DRAFTER)
    if not soft:
        ex = [type(e)(e.input_ids, e.model_inputs, e.output_ids, None) for e in ex]
    learner = DrafterLearner(drafter, engine.target.image_token_id, lr=3e-3, batch_size=8, seed=0)
    learner.model.load_state_dict(_scrambled(learner, 0))
    learner.add(ex)
    with torch.no_grad():
        before = learner.loss(ex).item()
    for _ in range(25):
        learner.step()
    with torch.no_grad():
        after = learner.loss(ex).item()
    assert learner.steps == 25 and after < 0.6 * before, (before, after)


def test_new_drafter_weights_change_acceptance_never_the_output(rows):
    engine, requests, results = rows
    drafted, accepted = engine.stats.drafted, engine.stats.accepted
    learner = DrafterLearner(DRAFTER, engine.target.image_token_id)
    try:
        engine.update_drafter(_scrambled(learner, 1, scale=0.15), 1)
        assert engine.drafter_version == 1
        again = engine.generate(requests, GREEDY)
        d, a = engine.stats.drafted - drafted, engine.stats.accepted - accepted
        assert [r.text for r in again] == [r.text for r in results]
        assert [r.token_ids for r in again] == [r.token_ids for r in results]
        assert a / d < 0.5 * accepted / drafted, (a / d, accepted / drafted)  # the new weights are the ones drafting
    finally:
        engine.update_drafter(learner.state_dict(), 2)  # the shipped weights back, for the tests that follow


def test_sampling_keeps_the_targets_distribution_while_the_drafter_changes(rows):
    """Rows sampled over several calls, the drafter's weights replaced between every two: after the most likely
    first token (the target's own pick, before any draft), the second token, the first one drafted for, has the
    target's own temperature-warped distribution (chi-square against the target's probabilities)."""
    engine, requests, _ = rows
    temperature = 3.0
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(TARGET, dtype=torch.float32)
    eos = sorted(engine.target.eos_ids)

    def probs(prompt, ids):
        with torch.inference_mode():
            logits = model(**hf_forward_inputs(prompt, ids)).logits[0, -1]
        p = torch.softmax(logits.double() / temperature, -1)
        p[eos[0]] = p[eos].sum()  # a row that stopped drew an EOS: counted on the first EOS id
        p[eos[1:]] = 0
        return p

    def spread(p):  # outcomes likely enough to test
        return int((p * 1600 >= 5).sum())

    # a row whose first token is nearly settled and whose second (the first drafted one) is not
    candidates = []
    for prompt in requests:
        p1 = probs(prompt, prompt.input_ids)
        first = p1.argmax().item()
        p = probs(prompt, [*prompt.input_ids, first])
        candidates.append((p1[first].item() * min(spread(p), 6), prompt, first, p))
    _, prompt, first, p = max(candidates, key=lambda c: c[0])
    learner = DrafterLearner(DRAFTER, engine.target.image_token_id)
    seconds = []
    try:
        for call in range(5):
            engine.update_drafter(_scrambled(learner, call) if call % 2 else learner.state_dict(), 10 + call)
            params = SamplingParams(max_new_tokens=2, temperature=temperature, seed=100 + call)
            for r in engine.generate([prompt] * 320, params):
                if r.token_ids[:1] == [first]:
                    seconds.append(r.token_ids[1] if len(r.token_ids) == 2 else eos[0])
    finally:
        engine.update_drafter(learner.state_dict(), 20)
    stat, p_value, tested = chi_square(seconds, p)
    assert len(seconds) > 600 and tested >= 4, (len(seconds), tested)
    assert p_value > 1e-4, (stat, p_value)


def test_the_saved_drafter_loads_and_drafts(rows, tmp_path):
    engine, requests, results = rows
    learner = DrafterLearner(DRAFTER, engine.target.image_token_id, lr=1e-4, batch_size=8)
    learner.add(examples(requests, results, engine.drafter.ck.tokenizer.eos_token_id, images=True))
    learner.step()
    learner.save(tmp_path / "drafter")
    other = SpecEngine(EngineConfig(TARGET, str(tmp_path / "drafter"), dtype="float32", num_draft_tokens=4))
    out = other.generate(requests[:8], GREEDY)
    assert [r.text for r in out] == [r.text for r in results[:8]]
    assert other.stats.drafted > 0 and other.stats.accepted / other.stats.drafted > 0.5
    state = learner.state_dict()
    name = next(k for k in state if "language_model" in k and k.endswith("q_proj.weight"))
    layer = int(name.split("layers.")[1].split(".")[0])
    assert torch.equal(other.drafter.ck.decoder.layers[layer]["qkv"][:state[name].shape[0]], state[name])


def test_a_new_version_is_measured_at_the_next_probe_on_its_own_rounds_not_in_every_call():
    """Where the drafter did not pay, new weights arriving before every call (a trainer that publishes often) do
    not make every call pay for the drafter's prefill: one call in probe_every speculates, and that probe forgets
    the old weights' acceptance so that the new ones are judged on their own rounds."""
    from engine.draft_length import DraftLength

    policy = DraftLength(None, probe_every=4)
    policy.pays = lambda: False  # the old drafter's prefill cost more than it saved
    policy.accept.observe([0, 0], [4, 4], offered=4)
    calls = []
    for _ in range(12):
        policy.drafter_changed()
        calls.append(policy.use_drafter())
        if calls[-1]:
            assert not policy.accept.seen  # the probe measures the new weights afresh
            policy.accept.observe([4, 4], [4, 4], offered=4)
    assert calls == [False, False, False, True] * 3
    policy.pays = lambda: True  # where speculation pays, every call speculates and new weights change nothing else
    policy.drafter_changed()
    assert policy.use_drafter() and policy.accept.seen


def test_the_learner_trains_each_row_about_passes_times_then_waits_for_new_rows(rows):
    engine, requests, results = rows
    ex = examples(requests, results, engine.drafter.ck.tokenizer.eos_token_id, images=False)
    learner = DrafterLearner(TEXT_DRAFTER, engine.target.image_token_id, batch_size=8)
    learner.add(ex[:16])
    steps = 0
    while learner.ready(passes=1.5) and steps < 10:
        learner.step()
        steps += 1
    assert steps == 3  # 3 x 8 rows drawn from 16 seen: 1.5 passes
    assert learner.ready()  # without a cap it would go on fitting the same rows
    learner.add(ex[16:24])
    assert learner.ready(passes=1.5)  # new rows: 24 x 1.5 = 36 rows' worth, 24 used
