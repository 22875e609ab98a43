"""Carrying a trained model over to a new tokenizer (training/adapt.py): the LLaVA-style tokenizer's pair moved to
Qwen2.5-VL's tokens keeps every weight, and each text token's embedding follows its string."""
from __future__ import annotations

import pytest
import torch

from training.adapt import SPACE, embedding_sources, retokenized
from training.modelpair import build_qwen_vlm
from training.tokenizer import train_tokenizer

SPEC = {"vision": {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
        "text": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128}}


@pytest.fixture(scope="module")
def tokenizers():
    return train_tokenizer(num_texts=300), train_tokenizer(num_texts=300, style="qwen")


def test_tokens_find_their_old_rows(tokenizers):
    old, new = (t.get_vocab() for t in tokenizers)
    sources = embedding_sources(old, new)
    assert sources[new["<|image_pad|>"]] == old["<image>"] and sources[new["<|im_end|>"]] == old["</s>"]
    assert sources[new["Ġcircle"]] == old["Ġcircle"]
    assert sources[new["What"]] == old.get("What", old.get(SPACE + "What"))  # a line's start: " What" before
    assert new["<|vision_start|>"] not in sources  # no counterpart: the mean
    assert len(sources) > 0.8 * len(new)


def test_every_weight_is_carried_and_the_embedding_follows_the_strings(tokenizers):
    torch.manual_seed(0)
    old_tok, new_tok = tokenizers
    old, new = build_qwen_vlm(SPEC, old_tok), build_qwen_vlm(SPEC, new_tok)
    counts = retokenized(old, new, old_tok.get_vocab(), new_tok.get_vocab())
    assert counts["mapped"] + counts["mean"] == len(new_tok)
    before, after = old.state_dict(), new.state_dict()
    for name, tensor in after.items():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(tensor, before[name]), name
    emb_old, emb_new = old.get_input_embeddings().weight, new.get_input_embeddings().weight
    o, n = old_tok.get_vocab(), new_tok.get_vocab()
    assert torch.equal(emb_new[n["Ġsquare"]], emb_old[o["Ġsquare"]])
    assert torch.equal(emb_new[n["<|image_pad|>"]], emb_old[o["<image>"]])
    assert torch.allclose(emb_new[n["<|vision_start|>"]], emb_old.mean(0))
    assert new.get_output_embeddings().weight.data_ptr() == emb_new.data_ptr()  # still tied


def test_a_saved_drafter_is_carried_over(tokenizers, tmp_path):
    """--drafters-from: a saved text drafter (its own tokenizer beside it) starts the new one."""
    from training.adapt import carried
    from training.modelpair import build_qwen_text_lm

    torch.manual_seed(0)
    old_tok, new_tok = tokenizers
    spec = {"text": SPEC["text"]}
    build_qwen_text_lm(spec, old_tok).save_pretrained(tmp_path)
    old_tok.save_pretrained(tmp_path)
    new = build_qwen_text_lm(spec, new_tok)
    counts = carried(new, tmp_path, new_tok)
    assert counts["mapped"] > 0.8 * len(new_tok)
    from transformers import AutoModelForCausalLM

    old = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(new.model.layers[0].mlp.down_proj.weight, old.model.layers[0].mlp.down_proj.weight)
