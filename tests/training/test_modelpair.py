"""The shipped model pair and the recipe that trains it."""
from pathlib import Path

import pytest
import torch

from scenes import corpus
from training.evaluate import generate_answers, simulate_rounds
from training.modelpair import build_processor, build_text_lm, build_vlm, user_prompt
from training.tokenizer import IMAGE, train_tokenizer
from training.train import Batcher, ground_truth_batches, train_model
from training.vision_pretrain import patch_cells, pretrain_vision

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_shipped_vlms_reload_from_disk_and_generate():
    from transformers import AutoModelForImageTextToText

    from engine.processor import load_processor

    processor = load_processor(str(MODELS / "target"))
    s = [corpus.sample(corpus.SPLIT_SEEDS["test"], i, task="vqa") for i in range(4)]
    for name in ("target", "drafter-vlm"):
        model = AutoModelForImageTextToText.from_pretrained(MODELS / name).eval()
        assert model.config.model_type == "qwen2_5_vl"  # the family users run most: tower + merger, M-RoPE
        answers = generate_answers(model, processor, [(x.image, x.question) for x in s], max_new_tokens=24)
        assert all(a.endswith(".") and len(a.split()) >= 3 for a in answers), answers


def test_shipped_text_drafter_shares_the_tokenizer_and_generates():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.processor import load_processor

    tok = AutoTokenizer.from_pretrained(MODELS / "drafter-text")
    processor = load_processor(str(MODELS / "target"))
    assert tok.get_vocab() == processor.tokenizer.get_vocab()
    model = AutoModelForCausalLM.from_pretrained(MODELS / "drafter-text").eval()
    prompt = user_prompt(processor, "How many shapes are there?").replace(IMAGE, "")  # as it was trained
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip().startswith("There")


def test_shipped_weights_are_small_safetensors():
    files = list(MODELS.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"target", "drafter-vlm", "drafter-text"}
    assert sum(f.stat().st_size for f in files) <= 60 * 2**20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(num_texts=300)


@pytest.mark.parametrize("text", ["a<image>b", "<image><image>", " <image>\nx", "image<image>>", "<<image>", "<imag e>"])
def test_tokenizer_never_splits_or_fakes_the_image_placeholder(tokenizer, text):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(image_id) == text.count(IMAGE)
    assert tokenizer.decode(ids) == text
    others = [t for t in tokenizer.get_vocab() if t != IMAGE]
    assert not any("image>" in t or "<image" in t for t in others)


def test_processor_expands_one_placeholder_per_patch(tokenizer):
    processor = build_processor(tokenizer)
    enc = processor(text=[user_prompt(processor, "Q?")], images=[corpus.sample(1, 0).image])
    assert enc["input_ids"][0].count(tokenizer.convert_tokens_to_ids(IMAGE)) == (96 // 12) ** 2


def test_a_short_training_run_lowers_the_loss(tokenizer):
    torch.manual_seed(0)
    spec = {"vision": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
            "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": 128}}
    processor = build_processor(tokenizer)
    model = build_vlm(spec, tokenizer)
    vision = pretrain_vision(model.model.vision_tower, processor.image_processor, steps=6, batch_size=8, lr=3e-3,
                             seed=0, log_every=2)
    assert vision[-1] < vision[0]
    losses = train_model(model, ground_truth_batches(Batcher(processor), 8), steps=24, lr=3e-3, warmup=2,
                         name="test", log_every=3)
    assert losses[-1] < 0.8 * losses[0]
    text_lm = build_text_lm(spec, tokenizer)
    losses = train_model(text_lm, ground_truth_batches(Batcher(processor, with_image=False), 8), steps=24, lr=3e-3,
                         warmup=2, name="test-text", log_every=4)
    assert losses[-1] < 0.8 * losses[0]


def test_patch_cells_cover_the_grid():
    cells = patch_cells(96, 12)
    assert cells.shape == (64,) and set(cells.tolist()) == set(range(9))
    assert cells[0] == 0 and cells[-1] == 8 and cells[7] == 2 and cells[56] == 6


@pytest.mark.parametrize("matches, k, expected", [
    ([True] * 10, 4, (8, 8, 2)),      # all accepted: 4+1 tokens per round
    ([False] * 3, 4, (12, 0, 3)),     # nothing accepted: one token per round
    ([True, False, True, True], 2, (4, 3, 2)),  # round 1 accepts 1 (+1 corrected), round 2 accepts 2
])
def test_greedy_acceptance_simulation(matches, k, expected):
    assert simulate_rounds(matches, k) == expected
