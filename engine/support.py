"""Which models the engine runs, on which decoder, and why: decided from the model's config alone (no weights), so
a job can refuse a model at start with one line, and metrics.json can say what ran.

    lean      the engine's own decoder (engine/decoder.py): every backbone engine/backbone.py describes
    fallback  the generic forward (engine/hf_decoder.py): any other decoder-only backbone, or decoding.decoder: hf;
              it re-runs the model's own language model, and the parity check at load (engine/parity.py) refuses
              it where the model's attention is not the plain causal one the fallback gives it
    refused   what neither runs exactly: cross-attention to image features (Mllama), encoder-decoder models
              (Florence-2), video-only inputs; each with its one-line reason

`decoding.backend: hf` (plain `generate`) runs any of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.backbone import unsupported

HF_BACKEND = "use decoding.backend: hf"
# the VLMs whose own mask makes spans of the prompt attend bidirectionally (read from the processor's
# token_type_ids): each image's tokens (Gemma 3), the whole prefix, image and prompt (PaliGemma)
BLOCK_MASKS = {"gemma3": "images", "paligemma": "prefix"}


@dataclass(frozen=True)
class DecoderPlan:
    kind: str  # lean | fallback
    reason: str


def refusal(config) -> str | None:
    """Why no specray decoder can run this model exactly (None: one can)."""
    text = config.get_text_config()
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        return (f"{config.model_type} is an encoder-decoder model (its text decoder cross-attends to the encoder); "
                "the specray engine runs decoder-only language models")
    if getattr(text, "cross_attention_layers", None):
        return (f"{config.model_type} feeds images to its language model through cross-attention layers; "
                "the specray engine runs models that put image tokens into the decoder's sequence")
    return None


def plan(config, lean: bool = True) -> DecoderPlan:
    """The decoder a (not refused) model runs on, and why."""
    text = config.get_text_config()
    if not lean:
        return DecoderPlan("fallback", "decoding.decoder: hf")
    why = unsupported(text, standalone=not hasattr(config, "vision_config"))
    if why is None:
        return DecoderPlan("lean", f"{text.model_type} backbone")
    return DecoderPlan("fallback", why)


def check_model(path: str, trust_remote_code: bool = False, lean: bool = True) -> DecoderPlan:
    """The plan for the model at `path` (its config only); a ValueError of one line when it is refused."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    why = refusal(config)
    if why:
        raise ValueError(f"{path}: {why}; {HF_BACKEND}")
    return plan(config, lean)
