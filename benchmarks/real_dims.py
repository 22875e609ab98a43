"""Real checkpoints' dimensions, built offline: the public configs of Qwen2.5-VL-7B, Qwen3-VL-8B, Gemma-3-4B,
InternVL3-1B and SmolVLM-256M (widths, heads, head_dim, vocabulary, rope parameters, sliding windows, tie of the
embeddings, image sizes and image tokens per image), with only the layer counts cut (2 text layers, 1-2 vision
layers) to fit a CPU's memory. Weights are random, re-scaled (benchmarks/family_models._sharpen) so that outputs
follow the input. The tokenizer is the family's tiny one (benchmarks/family_tokenizers): the embedding and head
keep the real vocabulary's rows, every one of them live (only the vision tokens' head rows are zeroed), so greedy
decoding picks among all 49,280-262,208 ids; exactness is judged on token ids (most have no text here).

    python -m benchmarks.real_dims [--models qwen2_5_vl_7b ...] [--rows 4] [--new-tokens 8]

prints, per model: prompt tokens per row (image tokens), the KV cache per row at the cut depth and at the full
depth, HF `generate`'s and the engine's seconds per row (float32, batch --rows, mixed image sizes), and whether
the engine's tokens are HF's (each row alone).
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time

import torch
import transformers as tf
from PIL import Image

from benchmarks.family_models import _eos_ids, _save_model, _sharpen, sample_images
from benchmarks.family_tokenizers import family_tokenizer, vision_token_ids
from engine.processor import image_only_processor_class

# the published text configs (layers: the real count, cut to TEXT_LAYERS when built)
REAL = {
    "qwen2_5_vl_7b": {"family": "qwen2_5_vl", "layers": 28, "text": {
        "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
        "vision": {"depth": 2, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                   "patch_size": 14, "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [1]},
        "images": [(448, 448), (644, 476), (1120, 896), (560, 784)]},  # 256, 391, 1280, 560 image tokens
    "qwen3_vl_8b": {"family": "qwen3_vl", "layers": 36, "text": {
        "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True}},
        "vision": {"depth": 2, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
                   "patch_size": 16, "spatial_merge_size": 2, "num_position_embeddings": 2304,
                   "deepstack_visual_indexes": [0, 1]},
        "images": [(512, 512), (640, 480), (1024, 1024), (768, 576)]},  # 256, 300, 1024, 432 image tokens
    "gemma3_4b": {"family": "gemma3", "layers": 34, "text": {
        "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 256, "vocab_size": 262208, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 256, "sliding_window": 1024, "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}},
        "vision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 1, "num_attention_heads": 16,
                   "image_size": 896, "patch_size": 14, "vision_use_head": False},
        "images": [(896, 896), (640, 480), (320, 320), (1024, 768)]},  # 256 image tokens each
    "internvl3_1b": {"family": "internvl", "layers": 24, "text": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151674, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 1, "num_attention_heads": 16,
                   "image_size": [448, 448], "patch_size": [14, 14]},
        "images": [(448, 448), (896, 448), (448, 896), (672, 448)]},  # 1-3 tiles + thumbnail, 256 tokens each
    "smolvlm_256m": {"family": "smolvlm", "layers": 30, "text": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49280, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 1, "num_attention_heads": 12,
                   "image_size": 512, "patch_size": 16},
        "images": [(512, 512), (1024, 512), (512, 1024), (768, 768)]},  # 512-pixel tiles of 64 tokens + global
}
TEXT_LAYERS = 2


def _ids(family: str, tok) -> dict:
    ids = {f"{n}_token_id": getattr(tok, f"{n}_token_id") for n in ("bos", "eos", "pad")
           if getattr(tok, f"{n}_token_id") is not None}
    if family.startswith("qwen") or family == "internvl":
        ids["bos_token_id"] = tok.convert_tokens_to_ids("<|endoftext|>")
    return ids


def build(name: str, path) -> pathlib.Path:
    """Save `name`'s checkpoint (REAL) with its processor at `path`."""
    spec, path = REAL[name], pathlib.Path(path)
    family = spec["family"]
    tok = family_tokenizer(family)
    text = {**spec["text"], "num_hidden_layers": TEXT_LAYERS, **_ids(family, tok)}
    if "layer_types" not in text:
        text["layer_types"] = ["full_attention"] * TEXT_LAYERS
    torch.manual_seed(0)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        vision_ids = {"image_token_id": tok.image_token_id, "video_token_id": tok.video_token_id,
                      "vision_start_token_id": tok.vision_start_token_id,
                      "vision_end_token_id": tok.vision_end_token_id}
        patch = spec["vision"]["patch_size"]
        if family == "qwen2_5_vl":
            model = tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(
                text_config=text, vision_config=spec["vision"], **vision_ids))
            processor_class = tf.Qwen2_5_VLProcessor
        else:
            model = tf.Qwen3VLForConditionalGeneration(tf.Qwen3VLConfig(
                text_config=text, vision_config=spec["vision"], **vision_ids))
            processor_class = tf.Qwen3VLProcessor
        unit = patch * 2
        image_processor = tf.Qwen2VLImageProcessorPil(
            size={"shortest_edge": 64 * unit * unit, "longest_edge": 1280 * unit * unit}, patch_size=patch,
            merge_size=2, temporal_patch_size=2)
        processor = image_only_processor_class(processor_class)(image_processor=image_processor, tokenizer=tok,
                                                                 chat_template=tok.chat_template)
    elif family == "gemma3":
        model = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
            text_config=text, vision_config=spec["vision"], mm_tokens_per_image=256, boi_token_index=tok.boi_token_id,
            eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id))
        image_processor = tf.Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, do_pan_and_scan=False,
                                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
        processor = tf.Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                                       chat_template=tok.chat_template, image_seq_length=256)
    elif family == "internvl":
        model = tf.InternVLForConditionalGeneration(tf.InternVLConfig(
            text_config=text, vision_config=spec["vision"], image_token_id=tok.context_image_token_id,
            downsample_ratio=0.5))
        image_processor = tf.GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True,
                                                      min_patches=1, max_patches=12)
        processor = image_only_processor_class(tf.InternVLProcessor)(
            image_processor=image_processor, tokenizer=tok, image_seq_length=256, chat_template=tok.chat_template)
    else:  # smolvlm
        model = tf.SmolVLMForConditionalGeneration(tf.SmolVLMConfig(
            text_config=text, vision_config=spec["vision"], scale_factor=4, image_token_id=tok.image_token_id))
        image_processor = tf.SmolVLMImageProcessorPil(size={"longest_edge": 1024}, max_image_size={"longest_edge": 512},
                                                      do_image_splitting=True, image_mean=[0.5] * 3,
                                                      image_std=[0.5] * 3)
        processor = image_only_processor_class(tf.SmolVLMProcessor)(
            image_processor=image_processor, tokenizer=tok, video_processor=None, image_seq_len=64,
            chat_template=tok.chat_template)
    model.eval()
    _sharpen(model, model.config.get_text_config().vocab_size, vision_token_ids(family, tok))
    _save_model(model, tok, path, _eos_ids(family, tok))
    processor.save_pretrained(path)
    return path


def images(name: str) -> list[Image.Image]:
    """The model's test images: each of its sizes, drawn as benchmarks.family_models draws them, scaled up."""
    return [im.resize(size) for im, size in zip(sample_images(len(REAL[name]["images"]), seed=9), REAL[name]["images"])]


LONG = ("Describe the picture in detail: every shape, its colour, its place, what it touches, and the light. "
        * 20)  # about 1,200 tokens with the tiny tokenizer: past Gemma 3's 1,024-token window


def requests(name: str, path) -> list:
    """Four rows: the model's images (mixed sizes) with prompts from short to past Gemma 3's window."""
    from engine.processor import encode, load_processor
    from engine.request import Request

    processor = load_processor(str(path))
    prompts = ["What is shown?", LONG, "Count the shapes.", LONG[:1000]]
    out = []
    for i, (image, prompt) in enumerate(zip(images(name), prompts)):
        ids, arrays = encode(processor, prompt, image)
        out.append(Request(key=str(i), input_ids=ids, model_inputs=arrays))
    return out


@torch.inference_mode()
def hf_tokens(path, rows, new_tokens: int, with_eos: bool = False) -> list[list[int]]:
    """HF `generate`, one row at a time, float32, greedy: the reference token ids (EOS stripped, as the engine
    reports tokens; kept with `with_eos`)."""
    from transformers import AutoModelForImageTextToText

    from engine.model import eos_ids
    from engine.processor import load_processor
    from engine.request import stack_arrays

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = load_processor(str(path)).tokenizer
    eos = eos_ids(model.generation_config, tok)
    out = []
    for r in rows:
        ids = torch.as_tensor(r.input_ids, dtype=torch.long)[None]  # int64 numpy or a list
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        inputs |= stack_arrays([r.model_inputs], torch.float32, "cpu", len(r.input_ids))
        tokens = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=sorted(eos),
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0
                                )[0, ids.shape[1]:].tolist()
        stop = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        out.append(tokens[:stop + 1] if with_eos else tokens[:stop])
    return out


def kv_bytes_per_token(config, layers: int, dtype_bytes: int = 2) -> int:
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * layers * text.num_key_value_heads * head_dim * dtype_bytes


def run(name: str, root: pathlib.Path, new_tokens: int) -> dict:
    """Build `name`, then HF `generate` one row at a time (the reference) and the engine at batch 4, float32."""
    import gc

    from engine.config import EngineConfig
    from engine.engine import SpecEngine
    from engine.request import SamplingParams

    path = build(name, root / name)
    config = tf.AutoConfig.from_pretrained(path)
    rows = requests(name, path)
    params = SamplingParams(max_new_tokens=new_tokens)
    t = time.perf_counter()
    ref = hf_tokens(path, rows, new_tokens)  # the model's load included
    hf_s = (time.perf_counter() - t) / len(rows)
    gc.collect()
    engine = SpecEngine(EngineConfig(str(path), None, dtype="float32", max_batch_size=len(rows)))
    t = time.perf_counter()
    got = engine.generate(rows, params)
    engine_s = (time.perf_counter() - t) / len(rows)
    tokens = sum(len(r.input_ids) + new_tokens for r in rows) / len(rows)
    image_id = engine.target.image_token_id
    out = {"model": name, "prompt_tokens": [len(r.input_ids) for r in rows],
           "image_tokens": [r.input_ids.count(image_id) for r in rows],
           "kv_mib_per_row_cut": kv_bytes_per_token(config, TEXT_LAYERS) * tokens / 2**20,
           "kv_mib_per_row_full": kv_bytes_per_token(config, REAL[name]["layers"]) * tokens / 2**20,
           "hf_s_per_row": hf_s, "engine_s_per_row": engine_s,
           "exact": sum(g.token_ids == r for g, r in zip(got, ref)), "rows": len(rows),
           "distinct": len({tuple(r) for r in ref}), "parity": engine.target.parity}
    del engine
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(REAL))
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {TEXT_LAYERS} text layers of each, float32, 4 rows (mixed image sizes, prompts to past 1,024 tokens), "
          f"{args.new_tokens} new tokens; KV per row in bfloat16 at {TEXT_LAYERS} layers and at the full depth")
    print("| model | prompt tokens (image tokens) | KV MiB/row cut / full | HF s/row (1 row, load incl.) | "
          "specray s/row (batch 4) | "
          "exact | distinct rows |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = run(name, pathlib.Path(tmp), args.new_tokens)
            shown = ", ".join(f"{p} ({i})" for p, i in zip(r["prompt_tokens"], r["image_tokens"]))
            print(f"| {name} | {shown} | {r['kv_mib_per_row_cut']:.1f} / {r['kv_mib_per_row_full']:.1f} | "
                  f"{r['hf_s_per_row']:.2f} | {r['engine_s_per_row']:.2f} | {r['exact']}/{r['rows']} | "
                  f"{r['distinct']}/{r['rows']} |", flush=True)
            shutil.rmtree(pathlib.Path(tmp) / name)


if __name__ == "__main__":
    main()
