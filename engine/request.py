"""The contract between the generate stage and any engine: a Request in, a Result out, per row."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Request:
    key: str
    input_ids: np.ndarray  # int64: from the processor (engine/processor.py) or a view of the batch's Arrow column
    model_inputs: dict[str, np.ndarray]  # the processor's image tensors, e.g. pixel_values (1, 3, H, W)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)


@dataclass
class Result:
    text: str
    finish_reason: str  # stop | length | error
    num_output_tokens: int
    num_drafted_tokens: int = 0
    num_accepted_tokens: int = 0
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)  # the generated tokens (EOS excluded)
    # with the engine's capture_topk: the target's top-k (logits, ids), [n, k] each, at every generated position
    # (n: the tokens, plus the EOS where the row stopped on it); what a learning drafter distils from
    topk: tuple | None = None


def error_result(reason: str) -> Result:
    """The result of a row that could not be generated: no text, and why."""
    return Result(text="", finish_reason="error", num_output_tokens=0, error=reason)


# processor outputs with one entry per prompt token ([1, prompt_len]): padded to the batch's width, not stacked by shape
TOKEN_ALIGNED = ("token_type_ids", "mm_token_type_ids")


def shape_key(arrays: dict[str, np.ndarray]) -> tuple:
    """Requests whose image tensors share this key can be stacked into one batch."""
    return tuple((k, v.shape[1:]) for k, v in sorted(arrays.items()) if k not in TOKEN_ALIGNED)


def stack_arrays(arrays: list[dict[str, np.ndarray]], dtype, device, width: int | None = None,
                 left: bool = False) -> dict:
    """Same-shaped requests' image tensors as one batch of torch tensors (floats in the model's dtype); per-token
    entries (TOKEN_ALIGNED) padded with 0 to `width`, on the right (or the left, as the prompts are)."""
    import torch

    out = {}
    for name in arrays[0]:
        parts = [torch.from_numpy(np.asarray(a[name])) for a in arrays]
        if name in TOKEN_ALIGNED and width is not None:
            parts = [torch.nn.functional.pad(p, (width - p.shape[-1], 0) if left else (0, width - p.shape[-1]))
                     for p in parts]
        t = torch.cat(parts).to(device)
        out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def one_line(err: BaseException) -> str:
    """An exception as the one-line reason an error row carries."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:300]


def finish_text(tokenizer, tokens: list[int], stop: list[str]) -> tuple[str, bool]:
    """A row's output text (special tokens dropped, cut before the first stop string) and whether one was found."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    stopped = False
    for s in stop:
        if s in text:
            text, stopped = text[: text.index(s)], True
    return text.strip(), stopped
