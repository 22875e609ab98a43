"""Training on length groups (training/length_groups.py): the same loss and gradient as the padded batch, for the
model pair's three kinds of model, on every path a recipe step takes (plain, attention-supervised, token dropout
inside the tower), and a batch of mixed lengths really is split."""
from __future__ import annotations

import copy

import pytest
import torch

from training.attention_supervision import AttentionSupervision
from training.length_groups import GROUP_COST, LengthGroupedDecoder, length_grouped, plan
from training.modelpair import build_processor, build_qwen_processor, build_qwen_text_lm, build_qwen_vlm, build_vlm
from training.token_dropout import dropout_loss
from training.tokenizer import train_tokenizer
from training.train import Batcher, ground_truth_batches

QWEN = {"vision": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
        "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128}}
LLAVA = {"vision": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
         "text": QWEN["text"]}
MIX = {"caption": 0.5, "vqa": 0.5}  # long answers and short ones


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(num_texts=300)


def test_the_plan_covers_every_row_once_and_splits_only_where_padding_costs_more_than_a_call():
    lengths = [56, 85, 57, 80, 58, 56, 83, 59]
    groups = plan(lengths)
    assert sorted(r for rows, _ in groups for r in rows) == list(range(8))
    assert all(w == max(lengths[r] for r in rows) for rows, w in groups)
    cost = sum(len(rows) * w + GROUP_COST for rows, w in groups)
    assert len(groups) > 1 and cost < 8 * 85 + GROUP_COST
    assert plan([60] * 8) == [(list(range(8)), 60)]
    assert len(plan([60, 60, 61, 61])) == 1  # saving 2 padded tokens is not worth a call


def _loss_and_grads(model, loss_fn, grouped: bool):
    model = copy.deepcopy(model).train()
    if grouped:
        with length_grouped(model):
            assert any(isinstance(m, LengthGroupedDecoder) for m in model.modules())
            loss = loss_fn(model)
    else:
        loss = loss_fn(model)
    loss.backward()
    assert not any(isinstance(m, LengthGroupedDecoder) for m in model.modules())  # put back as it was
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model, loss_fn):
    (l0, g0), (l1, g1) = (_loss_and_grads(model, loss_fn, grouped) for grouped in (False, True))
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6), (l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-6), name
    return l0


def _mixed_batch(processor, with_image=True, **kw):
    batch = next(ground_truth_batches(Batcher(processor, with_image), 8, task_mix=MIX, **kw))
    assert len(plan(batch["attention_mask"].sum(1).tolist())) > 1  # the batch is split: the test means something
    return batch


def test_a_qwen_vlm_step_is_the_padded_batchs_on_every_recipe_path(tok):
    torch.manual_seed(0)
    model = build_qwen_vlm(QWEN, tok)
    batch = _mixed_batch(build_qwen_processor(tok))
    batch["asked"] = torch.tensor([[1, 2, 5], [0, -1, -1], [15, 3, -1], [7, 8, 9]] * 2)  # some rows ask, of each length
    plain = {k: v for k, v in batch.items() if k != "asked"}
    _assert_same(model, lambda m: m(**plain).loss)
    model.set_attn_implementation("eager")
    attend = AttentionSupervision({"weight": 1.0, "heads": [[1, 0], [0, 3]]})
    supervised = _assert_same(model, lambda m: attend.loss(m, batch))
    assert abs(supervised - model(**plain).loss) > 1e-3  # the attention loss is in it
    for method in ("tower-spread", "random"):
        _assert_same(model, lambda m: dropout_loss(m, batch, 0.5, method, torch.Generator().manual_seed(1), attend))


@pytest.mark.parametrize("kind", ["llava", "text"])
def test_the_llava_target_and_the_text_drafter_step_as_the_padded_batch(tok, kind):
    torch.manual_seed(0)
    if kind == "llava":
        model, batch = build_vlm(LLAVA, tok), _mixed_batch(build_processor(tok))
    else:
        model, batch = build_qwen_text_lm(QWEN, tok), _mixed_batch(build_qwen_processor(tok), with_image=False)
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    _assert_same(model, lambda m: m(**batch).loss)
