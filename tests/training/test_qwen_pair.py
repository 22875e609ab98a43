"""The model pair in the Qwen2.5-VL architecture (training/modelpair.py): its processor saves and reloads without
torchvision as a real checkpoint's does, with Qwen2.5-VL's own tokens and chat template; a few training steps on
the corpus lower the loss, and the engine runs the result exactly (multimodal RoPE on the lean decoder), with the
Qwen2 text drafter sharing its tokenizer."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import SpecEngine
from engine.request import Request, SamplingParams
from scenes import corpus
from training.modelpair import build_qwen_processor, build_qwen_text_lm, build_qwen_vlm, user_prompt
from training.tokenizer import QWEN_IMAGE, qwen_chat_template, train_tokenizer
from training.token_dropout import TokenDropout
from training.train import Batcher, ground_truth_batches, train_model

MODELS = Path(__file__).resolve().parents[2] / "models"  # the shipped pair
SPEC = {"vision": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
        "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128}}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    tok = train_tokenizer(num_texts=300, style="qwen")  # image first: Qwen2.5-VL's own template, as it is
    processor = build_qwen_processor(tok)
    model = build_qwen_vlm(SPEC, tok)
    losses = train_model(model, ground_truth_batches(Batcher(processor), 8), steps=80, lr=3e-3, warmup=5,
                         name="qwen", log_every=10)
    path = tmp_path_factory.mktemp("qwen-pair")
    model.save_pretrained(path / "target")
    processor.save_pretrained(path / "target")
    question_first = copy.deepcopy(tok)  # the shipped pair's prompt format, trained as briefly
    question_first.chat_template = qwen_chat_template(question_first=True)
    processor = build_qwen_processor(question_first)
    model = build_qwen_vlm(SPEC, question_first)
    train_model(model, ground_truth_batches(Batcher(processor), 8), steps=80, lr=3e-3, warmup=5, name="qwen-q",
                log_every=10)
    model.save_pretrained(path / "target-question-first")
    processor.save_pretrained(path / "target-question-first")
    build_qwen_text_lm(SPEC, tok).save_pretrained(path / "drafter-text")
    tok.save_pretrained(path / "drafter-text")
    return path, losses


def test_a_few_steps_lower_the_loss(pair):
    _, losses = pair
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_processor_reloads_without_torchvision_and_gives_one_token_per_merged_patch(pair):
    from engine.processor import load_processor

    assert importlib.util.find_spec("torchvision") is None
    path, _ = pair
    processor = load_processor(str(path / "target"))
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    s = corpus.sample(corpus.SPLIT_SEEDS["test"], 0)
    enc = processor(text=[user_prompt(processor, s.question)], images=[s.image])
    image_id = processor.tokenizer.convert_tokens_to_ids(QWEN_IMAGE)
    ids = list(enc["input_ids"][0])
    assert ids.count(image_id) == (corpus.IMAGE_SIZE // 24) ** 2
    assert enc["image_grid_thw"].tolist() == [[1, corpus.IMAGE_SIZE // 12, corpus.IMAGE_SIZE // 12]]


@pytest.mark.parametrize("target_dir", ["target", "target-question-first"])
def test_the_engine_runs_the_pair_exactly(pair, target_dir):
    """Image first (as Qwen2.5-VL's own template) and question first (the shipped pair's template): M-RoPE
    positions of text after the image start after the image's largest position, as in HF's own forward."""
    from transformers import AutoModelForImageTextToText

    from engine.processor import encode, load_processor
    from engine.request import stack_arrays

    path, _ = pair
    target = str(path / target_dir)
    processor = load_processor(target)
    samples = [corpus.sample(corpus.SPLIT_SEEDS["test"], i, task) for i, task in
               enumerate(["caption", "color", "position", "count", "shape", "exists"])]  # answers that differ
    ids, _ = encode(processor, samples[0].question, samples[0].image)
    image_at = ids.tolist().index(processor.tokenizer.convert_tokens_to_ids(QWEN_IMAGE))
    asked = processor.tokenizer.decode(ids[:image_at])
    assert (samples[0].question in asked) == (target_dir == "target-question-first"), asked
    requests = [Request(key=str(i), input_ids=ids, model_inputs=arrays)
                for i, (ids, arrays) in enumerate(encode(processor, s.question, s.image) for s in samples)]
    model = AutoModelForImageTextToText.from_pretrained(target, dtype=torch.float32).eval()
    params = SamplingParams(max_new_tokens=10)
    want = []
    for r in requests:
        ids = torch.tensor([r.input_ids])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        inputs |= stack_arrays([r.model_inputs], torch.float32, "cpu", len(r.input_ids))
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
        ends = [i for i, t in enumerate(out) if t in model.generation_config.eos_token_id]
        want.append(out[:ends[0]] if ends else out)
    assert len({tuple(w) for w in want}) >= 3, want  # the answers depend on the row
    for drafter in (None, str(path / "drafter-text")):
        engine = SpecEngine(EngineConfig(target, drafter, dtype="float32", max_batch_size=4))
        assert engine.target.plan.kind == "lean"
        assert [r.token_ids for r in engine.generate(requests, params)] == want


def test_the_qwen_tower_pretrains_on_scene_labels():
    """The vision pretraining the recipe starts from works on the Qwen2.5-VL tower (its merged tokens)."""
    from training.vision_pretrain import pretrain_vision

    torch.manual_seed(0)
    tok = train_tokenizer(num_texts=300, style="qwen")
    model = build_qwen_vlm(SPEC, tok)
    losses = pretrain_vision(model.model.visual, build_qwen_processor(tok).image_processor, steps=30,
                             batch_size=16, lr=3e-3, seed=0, log_every=10)
    assert losses[-1] < 0.9 * losses[0], losses


def test_token_dropout_trains_on_the_kept_tokens_at_their_own_positions(pair):
    """At keep 1.0 the dropout step is the model's own loss; at 0.5 it sees fewer tokens (a different loss) and
    its gradient reaches the merger and the decoder; dropped inside the tower, the tower's blocks too."""
    from transformers import AutoModelForImageTextToText

    from engine.processor import load_processor
    from training.token_dropout import dropout_loss

    path, _ = pair
    model = AutoModelForImageTextToText.from_pretrained(path / "target", dtype=torch.float32)
    batch = next(ground_truth_batches(Batcher(load_processor(str(path / "target"))), 4))
    g = torch.Generator().manual_seed(0)
    methods = ("random", "diversity", "tower-random", "tower-diversity", "tower-spread")
    with torch.no_grad():
        full = model(**batch).loss
        for method in methods:
            assert torch.allclose(dropout_loss(model, batch, 1.0, method, g), full, atol=1e-5)
        halves = [dropout_loss(model, batch, 0.5, m, g) for m in methods]
    assert all(abs(h - full) > 1e-4 for h in halves), (full, halves)
    loss = dropout_loss(model, batch, 0.5, "random", g)
    loss.backward()
    assert model.model.visual.merger.mlp[0].weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()
    dropout_loss(model, batch, 0.5, "tower-random", g, tower_layer=1).backward()
    assert model.model.visual.blocks[0].mlp.down_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="^token_dropout.methods: unknown 'tower'"):
        TokenDropout({"methods": ["random", "tower"]}, 0)


def test_a_supervised_dropout_step_is_the_supervised_loss_at_keep_1_and_supervises_the_kept_asked_tokens(pair):
    """The attend stage's token dropout: at keep 1.0 the step is exactly the supervised step on every token; at
    0.5 its attention loss counts the asked tokens that were kept (none kept: the language-model loss alone)."""
    from transformers import AutoModelForImageTextToText

    from engine.processor import load_processor
    from training.attention_supervision import AttentionSupervision
    from training.token_dropout import dropout_loss

    path, _ = pair
    model = AutoModelForImageTextToText.from_pretrained(path / "target", dtype=torch.float32)
    model.set_attn_implementation("eager")
    batch = next(ground_truth_batches(Batcher(load_processor(str(path / "target"))), 4, task_mix={"vqa": 1.0},
                                      asked_side=4))
    batch["asked"] = torch.tensor([[1, 2, 5], [0, -1, -1], [15, 3, -1], [7, 8, 9]])
    attend = AttentionSupervision({"weight": 1.0, "heads": [[1, 0], [0, 3]]})
    plain = {k: v for k, v in batch.items() if k != "asked"}
    with torch.no_grad():
        full = attend.loss(model, batch)
        assert abs(full - model(**plain).loss) > 1e-3  # the supervision adds to the loss
        g = torch.Generator().manual_seed(0)
        assert torch.allclose(dropout_loss(model, batch, 1.0, "random", g, attend), full, atol=1e-5)
        g = torch.Generator().manual_seed(3)
        half = dropout_loss(model, batch, 0.5, "random", g, attend)
        g = torch.Generator().manual_seed(3)  # the same tokens kept, no supervision
        unsupervised = dropout_loss(model, batch, 0.5, "random", g)
    assert half > unsupervised + 1e-3, (half, unsupervised)


def test_the_asked_tokens_are_renumbered_among_the_kept_ones_and_dropped_ones_leave():
    from training.token_dropout import kept_asked

    kept = torch.tensor([[0, 2, 5], [1, 3, 4]])
    asked = torch.tensor([[2, 5, 1], [4, -1, -1]])
    assert kept_asked(asked, kept, 6).tolist() == [[1, 2, -1], [2, -1, -1]]


# Qwen2.5-VL-7B-Instruct's chat template as published with the checkpoint (its chat_template.json), written out
# here from the published text: the reference the pair's template must render identically to
QWEN25_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": [{"type": "text", "text": "Read the text."}, {"type": "image"}, {"type": "video"}]},
     {"role": "assistant", "content": "ABC"}, {"role": "user", "content": "And the colour?"}],
    [{"role": "user", "content": "No image at all."}],
]


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_the_qwen_template_renders_as_qwen25_vls_own(conversation):
    """Image first, the pair's template is Qwen2.5-VL's; question first, the same but for the order of a turn's
    text and images."""
    from jinja2 import Environment

    env = Environment()
    messages = CONVERSATIONS[conversation]
    for gen in (True, False):
        want = env.from_string(QWEN25_VL_TEMPLATE).render(messages=messages, add_generation_prompt=gen)
        assert env.from_string(qwen_chat_template()).render(messages=messages, add_generation_prompt=gen) == want
        reordered = [{**m, "content": sorted(m["content"], key=lambda p: p["type"] != "text")}
                     if isinstance(m["content"], list) else m for m in messages]
        want = env.from_string(QWEN25_VL_TEMPLATE).render(messages=reordered, add_generation_prompt=gen)
        assert env.from_string(qwen_chat_template(True)).render(messages=messages, add_generation_prompt=gen) == want


def test_the_shipped_pair_speaks_qwen25_vls_tokens():
    """models/: Qwen2.5-VL's special tokens with ids of their own, its chat template (question first), a real
    video token; every model of the pair shares the tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from engine.processor import chat_text, load_processor

    processor = load_processor(str(MODELS / "target"))
    tok, config = processor.tokenizer, AutoConfig.from_pretrained(MODELS / "target")
    ids = {name: tok.convert_tokens_to_ids(name) for name in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>",
            "<|endoftext|>")}
    assert len(set(ids.values())) == len(ids) and None not in ids.values()
    assert (config.image_token_id, config.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    assert (config.vision_start_token_id, config.vision_end_token_id) == (ids["<|vision_start|>"], ids["<|vision_end|>"])
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert not {"<s>", "</s>", "<image>", "<unk>"} & set(tok.get_vocab())
    assert GenerationConfig.from_pretrained(MODELS / "target").eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    text = chat_text(processor, "What color is the circle?")
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "What color is the circle?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
                    "<|im_start|>assistant\n")
    for drafter in ("drafter-vlm", "drafter-text"):
        assert AutoTokenizer.from_pretrained(MODELS / drafter).get_vocab() == tok.get_vocab()
