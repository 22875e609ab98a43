"""The parity check at load: the engine's decoder against the model's own `generate`, on two synthetic rows,
before any row is decoded. A model whose forward the engine reproduces wrongly (an attention rule it does not
apply, positions it does not know, a batch whose rows leak into each other) is refused at start with one line,
never run wrong.

The rows are the model's own chat turns over two synthetic images of different sizes, with prompts of different
lengths (through its saved processor), or two text prompts for a text model (or a VLM saved without a
processor). HF greedy-generates STEPS tokens for each row alone and returns its logits at each; the engine
prefills both rows as one batch and is fed the same tokens (teacher-forced, both rows in one forward from their
own lengths), and its logits at those positions must agree within the dtype's rounding. Rows of different lengths
in one batch are where a position or cache-index bug that batch-1 decoding hides shows.

Agreement, per generated position:
- the largest logit difference within TOLERANCE of the logits' scale (max |logit|, at least 1), and
- no confident argmax flip (HF's top-2 margin over twice that), and
- in half precision, the relative RMS difference (RMS of the difference over the RMS of HF's centred logits)
  within REL_RMS: rounding spreads thinly over the vocabulary, a wrong position or mask moves every logit.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from engine.support import HF_BACKEND

STEPS = 8  # generated positions compared per row
# the largest logit difference that is rounding, relative to the logits' scale (max |logit|, at least 1)
TOLERANCE = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 4e-2}
# the relative RMS difference that is rounding (float32 is held by TOLERANCE alone). Measured in bfloat16 on the
# shipped pair's target (8 layers) and the tiny families (2 layers): rounding gives a max difference of 0.2-0.4%
# of the scale and a relative RMS of 0.7-1.0% (float16: 0.1-0.5%); a rope offset of +1 on the generated tokens 30-130%, every row
# decoding at the batch's largest position 50-145%. The bounds keep 5-10x the rounding seen (deeper real
# checkpoints round more: none could be measured here) and stay 6x under the smallest bug.
REL_RMS = {torch.float16: 2e-2, torch.bfloat16: 5e-2}
PROMPTS = ("Describe the picture in one sentence.",
           "Look closely at the shapes, the colours and the light, then say what the picture shows and where.")
IMAGE_SIZES = ((96, 80), (64, 112))  # width, height


def sample_inputs(model) -> tuple[list[tuple[np.ndarray, dict[str, np.ndarray]]], str]:
    """Two rows [(prompt ids, the processor's image tensors)] and what they are, for the model at model.path."""
    if model.is_vlm:
        from engine.processor import encode, load_processor, synthetic_image

        try:
            processor = load_processor(model.path)
        except (OSError, ValueError, ImportError, TypeError):
            processor = None  # a VLM saved without its processor: the text path is still checked
        if processor is not None:
            rows = [encode(processor, p, synthetic_image(*size)) for p, size in zip(PROMPTS, IMAGE_SIZES)]
            return rows, "image prompts"
    return [(np.asarray(model.tokenizer(p)["input_ids"], np.int64), {}) for p in PROMPTS], "text prompts"


@torch.inference_mode()
def reference_logits(model, ids: np.ndarray, arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, list[int]]:
    """HF's greedy generation from one row alone: its logits [STEPS, vocab] and the tokens it chose."""
    from engine.request import stack_arrays

    inputs = {"input_ids": torch.from_numpy(np.asarray(ids, np.int64))[None].to(model.device)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs |= stack_arrays([arrays], model.dtype, model.device, len(ids)) if arrays else {}
    out = model.model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=model.pad_id)
    logits = torch.cat([step.float() for step in out.logits])  # [STEPS, vocab]
    return logits, out.sequences[0, len(ids):].tolist()


@torch.inference_mode()
def engine_logits(model, rows: list[tuple[np.ndarray, dict]], tokens: list[list[int]]) -> torch.Tensor:
    """The engine's logits [rows, STEPS, vocab] at the same positions: one batched prefill of every row, then each
    row's tokens fed back in one forward, from each row's own length."""
    dec = model.decoder
    pe = model.embed_prompts([ids for ids, _ in rows], [arrays for _, arrays in rows])
    cache = dec.new_cache()
    cache.allocate(len(rows), max(pe.lengths) + STEPS + 1)
    length = torch.tensor(pe.lengths, device=model.device)
    first = dec.logits(model.prefill(cache, pe, last=length - 1)[:, 0])  # [rows, vocab]
    fed = dec.embed(torch.tensor([t[:-1] for t in tokens], device=model.device))
    rest = dec.logits(dec.forward(cache, fed, length))  # [rows, STEPS - 1, vocab]
    return torch.cat([first[:, None].float(), rest.float()], 1)


def compare(ref: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """Per position [..]: whether it disagrees beyond rounding, and the figures ([..] tensors and the tolerance)."""
    width = min(ref.shape[-1], got.shape[-1])
    ref, got = ref[..., :width], got[..., :width]
    tol = TOLERANCE.get(dtype, 8e-2) * max(1.0, float(ref.abs().max()))
    diff = (got - ref).abs().amax(-1)
    top2 = ref.topk(2, -1).values
    flipped = (got.argmax(-1) != ref.argmax(-1)) & (top2[..., 0] - top2[..., 1] > 2 * tol)
    centred = ref - ref.mean(-1, keepdim=True)
    rel = (got - ref).pow(2).mean(-1).sqrt() / centred.pow(2).mean(-1).sqrt().clamp_min(1e-6)
    bad = (diff > tol) | flipped | (rel > REL_RMS.get(dtype, float("inf")))
    return bad, {"diff": diff, "rel": rel, "tol": tol}


def check(model) -> dict:
    """Refuse (ValueError, one line) a model whose engine forward disagrees with its own generate; else what was
    compared, and what it cost (seconds)."""
    t0 = time.perf_counter()
    rows, kind = sample_inputs(model)
    refs = [reference_logits(model, ids, arrays) for ids, arrays in rows]
    try:
        got = engine_logits(model, rows, [tokens for _, tokens in refs])
    except ValueError as e:
        raise ValueError(f"{model.path}: the {model.plan.kind} decoder cannot run {model.family}: {e}; "
                         f"{HF_BACKEND}") from None
    bad, f = compare(torch.stack([logits for logits, _ in refs]), got, model.dtype)
    lengths = [len(ids) for ids, _ in rows]
    result = {"prompt": kind, "rows": len(rows), "prompt_tokens": lengths, "positions": STEPS,
              "max_abs_diff": round(float(f["diff"].max()), 6), "tolerance": round(f["tol"], 6),
              "max_rel_rms": round(float(f["rel"].max()), 6), "rel_rms_tolerance": REL_RMS.get(model.dtype),
              "seconds": round(time.perf_counter() - t0, 3)}
    if bad.any():
        row, at = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{model.path}: the {model.plan.kind} decoder disagrees with {model.family}'s own forward at generated "
            f"position {at} of row {row} in the parity check ({kind} of {lengths} tokens, batched): logits differ "
            f"by {float(f['diff'][row, at]):.4g} (tolerance {f['tol']:.3g}), relative RMS "
            f"{float(f['rel'][row, at]):.3g}; refusing to run it wrong; {HF_BACKEND}")
    return result
