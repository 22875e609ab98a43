"""The parity check at load: the engine's decoder against the model's own `generate`, on one synthetic prompt,
before any row is decoded. A model whose forward the engine reproduces wrongly (an attention rule it does not
apply, positions it does not know) is refused at start with one line, never run wrong.

The prompt is the model's own chat turn over a synthetic image (through its saved processor), or a text prompt
for a text model (or a VLM saved without a processor). HF greedy-generates a few tokens and returns its logits at
each; the engine prefills the same prompt and is fed the same tokens (teacher-forced), and its logits at those
positions must agree within the dtype's rounding.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.support import HF_BACKEND

STEPS = 4  # generated positions compared
# the largest logit difference that is rounding, relative to the logits' scale (max |logit|, at least 1)
TOLERANCE = {torch.float32: 2e-3, torch.float16: 3e-2, torch.bfloat16: 8e-2}
PROMPT = "Describe the picture in one sentence."


def synthetic_image(width: int = 96, height: int = 80):
    """A fixed image with structure in both axes (so an image-blind forward would show)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255) // width, (y * 255) // height, ((x // 8 + y // 8) % 2) * 255], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def sample_inputs(model) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """(prompt ids, the processor's image tensors, what the prompt is) for the model at model.path."""
    if model.is_vlm:
        from engine.processor import encode, load_processor

        try:
            processor = load_processor(model.path)
        except (OSError, ValueError, ImportError, TypeError):
            processor = None  # a VLM saved without its processor: the text path is still checked
        if processor is not None:
            ids, arrays = encode(processor, PROMPT, synthetic_image())
            return ids, arrays, "image prompt"
    ids = model.tokenizer(PROMPT)["input_ids"]
    return np.asarray(ids, np.int64), {}, "text prompt"


@torch.inference_mode()
def reference_logits(model, ids: np.ndarray, arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, list[int]]:
    """HF's greedy generation from the prompt: its logits [STEPS, vocab] and the tokens it chose."""
    from engine.request import stack_arrays

    inputs = {"input_ids": torch.from_numpy(np.asarray(ids, np.int64))[None].to(model.device)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs |= stack_arrays([arrays], model.dtype, model.device, len(ids)) if arrays else {}
    pad = model.pad_id
    out = model.model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
    logits = torch.cat([step.float() for step in out.logits])  # [STEPS, vocab]
    return logits, out.sequences[0, len(ids):].tolist()


@torch.inference_mode()
def engine_logits(model, ids: np.ndarray, arrays: dict[str, np.ndarray], tokens: list[int]) -> torch.Tensor:
    """The engine's logits at the same positions: a prefill, then the tokens fed back in one forward."""
    dec = model.decoder
    pe = model.embed_prompts([ids], [arrays])
    cache = dec.new_cache()
    cache.allocate(1, pe.lengths[0] + len(tokens) + 1)
    length = torch.tensor(pe.lengths, device=model.device)
    first = dec.logits(model.prefill(cache, pe, last=length - 1)[:, 0])  # [1, vocab]
    fed = dec.embed(torch.tensor([tokens[:-1]], device=model.device))
    rest = dec.logits(dec.forward(cache, fed, length))[0]
    return torch.cat([first, rest])


def check(model) -> dict:
    """Refuse (ValueError, one line) a model whose engine forward disagrees with its own generate; else what was
    compared."""
    ids, arrays, kind = sample_inputs(model)
    ref, tokens = reference_logits(model, ids, arrays)
    try:
        got = engine_logits(model, ids, arrays, tokens)
    except ValueError as e:
        raise ValueError(f"{model.path}: the {model.plan.kind} decoder cannot run {model.family}: {e}; "
                         f"{HF_BACKEND}") from None
    width = min(ref.shape[-1], got.shape[-1])
    ref, got = ref[:, :width], got[:, :width]
    tol = TOLERANCE.get(model.dtype, 8e-2) * max(1.0, float(ref.abs().max()))
    diff = (got - ref).abs().amax(-1)  # per position
    top2 = ref.topk(2, -1).values
    flipped = (got.argmax(-1) != ref.argmax(-1)) & (top2[:, 0] - top2[:, 1] > 2 * tol)
    bad = ((diff > tol) | flipped).nonzero()
    result = {"prompt": kind, "prompt_tokens": len(ids), "positions": len(tokens),
              "max_abs_diff": round(float(diff.max()), 6), "tolerance": round(tol, 6)}
    if len(bad):
        at = int(bad[0, 0])
        raise ValueError(
            f"{model.path}: the {model.plan.kind} decoder disagrees with {model.family}'s own forward at generated "
            f"position {at} of the parity check ({kind} of {len(ids)} tokens): logits differ by "
            f"{float(diff[at]):.4g} (tolerance {tol:.3g}); refusing to run it wrong; {HF_BACKEND}")
    return result
