"""Every VLM family's saved processor works in the pipeline without torchvision: preprocess_row gives the right
image tokens and model inputs the family's HF model accepts (tiny checkpoints from benchmarks/family_models)."""
import importlib.util
import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
import transformers as tf
from PIL import Image

from actors.generate_rows import read_tensors
from benchmarks.family_models import build_family, sample_images
from engine.processor import chat_text, check_processor, load_processor
from pipeline.preprocess import preprocess_row

GENERATING = ("llava", "llava_next", "llava_onevision", "idefics3", "smolvlm", "internvl", "aya_vision", "mistral3",
              "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma")
LOAD_ONLY = ("mllama", "florence2")  # the engine refuses them; their processors still have to load
# image tokens in input_ids for a 96x96 image: 4x4 CLIP patches of 12; Qwen resized to 112 (patch 14) or 128
# (patch 16), 8x8 patches merged 2x2; Gemma3 8x8 SigLIP patches pooled 2x2; PaliGemma 4x4 patches; Mllama one
# <|image|> (its image goes in by cross-attention); Florence-2 4x4 + 1. LLaVA-NeXT and OneVision: 4x4 for the
# base image, 2x2 tiles of 4x4 and a newline per row of 8; Idefics3, SmolVLM, InternVL, Aya Vision: 2x2 tiles and
# the global view, 4 tokens each; Mistral3 (Pixtral): 96 resized to 64, 8x8 patches merged 2x2.
IMAGE_TOKENS = {"llava_next": 88, "llava_onevision": 88, "idefics3": 20, "smolvlm": 20, "internvl": 20,
                "aya_vision": 20, "mistral3": 16, "llava": 16, "qwen2_vl": 16, "qwen2_5_vl": 16, "qwen3_vl": 16, "gemma3": 16, "paligemma": 16,
                "mllama": 1, "florence2": 17}
PROMPT = "What color is the circle?"


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {family: str(build_family(family, root / family)) for family in GENERATING + LOAD_ONLY}


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_token_id(path: str) -> int:
    config = tf.AutoConfig.from_pretrained(path)
    return getattr(config, "image_token_id", None) or config.image_token_index


def preprocess(path: str, image: Image.Image, prompt: str = PROMPT) -> tuple[list[int], dict]:
    """preprocess_row's input_ids (as a list: the row carries them as int64 numpy) and its model inputs, read back
    from Arrow as the generate stage reads them."""
    row = preprocess_row({"shard": "s", "key": "k", "image": png(image), "fields": {"q": prompt}}, path, "{q}", 10**7)
    assert row["error"] is None, row["error"]
    entries = pa.array([row["model_inputs"]])
    return row["input_ids"].tolist(), {k: torch.from_numpy(np.array(v)) for k, v in read_tensors(entries)[0].items()}


def test_no_torchvision_here():
    assert importlib.util.find_spec("torchvision") is None  # what this file checks is working without it


@pytest.mark.parametrize("family", GENERATING)
def test_preprocessed_row_feeds_the_model(families, family):
    path = families[family]
    image, other = (im.resize((96, 96)) for im in sample_images(2, seed=3))
    ids, inputs = preprocess(path, image)
    processor = load_processor(path)
    assert not hasattr(processor, "video_processor")
    assert ids.count(image_token_id(path)) == IMAGE_TOKENS[family]
    assert ids.count(processor.tokenizer.bos_token_id) <= 1 and PROMPT in processor.tokenizer.decode(ids)
    # the same as the processor called directly, as HF's examples do
    direct = processor(text=[chat_text(processor, PROMPT)], images=[image], return_tensors="pt")
    assert direct["input_ids"][0].tolist() == ids
    assert set(inputs) == set(direct) - {"input_ids", "attention_mask", "labels"}
    assert all(torch.equal(inputs[k], direct[k]) for k in inputs)

    model = tf.AutoModelForImageTextToText.from_pretrained(path).eval()
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **inputs,
                             max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert out.shape == (1, len(ids) + 4)
        # the image matters: another image, the same prompt, other logits for the next token
        other_ids, other_inputs = preprocess(path, other)
        first = model(input_ids=input_ids, **inputs).logits[0, -1]
        second = model(input_ids=torch.tensor([other_ids]), **other_inputs).logits[0, -1]
    assert not torch.allclose(first, second, atol=1e-4)


def test_qwen_image_tokens_follow_the_image_size(families):
    path = families["qwen2_vl"]
    ids, inputs = preprocess(path, Image.new("RGB", (96, 64), (200, 30, 30)))
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert ids.count(image_token_id(path)) == t * h * w // 4 and (h, w) != (8, 8)


@pytest.mark.parametrize("family", LOAD_ONLY)
def test_refused_families_still_preprocess(families, family):
    ids, inputs = preprocess(families[family], sample_images(1)[0].resize((96, 96)))
    assert ids.count(image_token_id(families[family])) == IMAGE_TOKENS[family]  # Florence-2: one image's worth
    assert "pixel_values" in inputs


def test_paligemma_prompt_has_one_image_then_bos_then_the_prompt(families):
    processor = load_processor(families["paligemma"])
    assert chat_text(processor, PROMPT) == f"<image>{PROMPT}"
    ids, _ = preprocess(families["paligemma"], sample_images(1)[0])
    tok = processor.tokenizer
    assert ids == [tok.convert_tokens_to_ids("<image>")] * 16 + [tok.bos_token_id] + tok.encode(f"{PROMPT}\n")


def test_qwen_checkpoint_in_the_older_layout_loads(families, tmp_path):
    """preprocessor_config.json, video_preprocessor_config.json and chat_template.json, as most Qwen-VL
    checkpoints on the hub are laid out, instead of one processor_config.json."""
    path = tmp_path / "qwen"
    shutil.copytree(families["qwen2_vl"], path)
    config = json.loads((path / "processor_config.json").read_text())
    (path / "processor_config.json").unlink()
    for name, key in (("preprocessor_config.json", "image_processor"), ("video_preprocessor_config.json",
                                                                         "video_processor")):
        (path / name).write_text(json.dumps({**config[key], "processor_class": "Qwen2VLProcessor"}))
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    ids, inputs = preprocess(str(path), sample_images(1)[0].resize((96, 96)))
    assert ids == preprocess(families["qwen2_vl"], sample_images(1)[0].resize((96, 96)))[0]
    assert type(load_processor(str(path))).__name__ == "Qwen2VLProcessor"


def test_a_processor_that_fails_on_every_row_is_refused_with_one_line(families, tmp_path):
    """A processor that loads but fails on a one-image prompt (here: a chat template that raises) would make
    every row an error row: check_processor (called at a job's start) refuses it with one line."""
    path = tmp_path / "qwen"
    shutil.copytree(families["qwen2_5_vl"], path)
    (path / "chat_template.jinja").write_text("{{ raise_exception('this template takes no images') }}")
    load_processor.cache_clear()
    with pytest.raises(ValueError) as e:
        check_processor(str(path))
    assert "\n" not in str(e.value) and str(e.value).startswith("its processor fails on a one-image prompt")
    assert "this template takes no images" in str(e.value)
    check_processor(families["qwen2_5_vl"])  # the family's own passes


@pytest.mark.parametrize("family", ["smolvlm", "mistral3"])
def test_smolvlm_and_mistral3_processors_run_without_torchvision(families, family):
    """SmolVLM's chat template read its (missing) video processor's defaults; Pixtral's processor module imports
    the torchvision image processor. Both now run on their PIL image processors."""
    check_processor(families[family])
    processor = load_processor(families[family])
    assert type(processor.image_processor).__name__.endswith("Pil")
