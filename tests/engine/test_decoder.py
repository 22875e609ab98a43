"""The lean decoder against the Hugging Face forward of the same weights, for a batched prefill and then ragged
continuations (every row at its own length): Llama, Qwen2 (q/k/v biases), Mistral (sliding window), Qwen3 (q/k
norm), Gemma ((1 + w) norms, scaled embeddings, GeGLU), Gemma 2 (sandwich norms, soft-capping, alternating
sliding and global layers) and Gemma 3 (q/k norm, a RoPE base per layer type)."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from engine.decoder import LeanDecoder
from engine.hf_decoder import HFDecoder
from engine.model_drafter import ModelDrafter
from engine.request import SamplingParams

SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SIZES)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SIZES, sliding_window=6)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SIZES, head_dim=16)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**SIZES, head_dim=16)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**SIZES, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                                                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        **SIZES, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}})),
}


def randomize_norms(model) -> None:
    """Norm weights start at 0 (Gemma: 1 + w) or 1: drawn at random, a norm applied wrongly shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)


def with_cache(dec, slots: int, max_len: int):
    """A decoder and an empty cache of its own for `slots` rows of up to `max_len` positions."""
    cache = dec.new_cache()
    cache.allocate(slots, max_len)
    return dec, cache


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("decoder_cls", [LeanDecoder, HFDecoder])
def test_prefill_and_ragged_continuation_match_the_hf_forward(arch, decoder_cls):
    torch.manual_seed(0)
    model = MODELS[arch]().eval()
    randomize_norms(model)
    ids = torch.randint(0, SIZES["vocab_size"], (3, 24))
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        dec, cache = with_cache(decoder_cls(model.model, model.lm_head, model.config, "cpu", torch.float32), 3, 40)
        prompt = [10, 13, 7]  # a right-padded, ragged prefill: rows 0 and 2 write padding past their length
        hidden = dec.forward(cache, dec.embed(ids[:, :13]), torch.zeros(3, dtype=torch.long))
        for b, n in enumerate(prompt):
            torch.testing.assert_close(dec.logits(hidden[b, :n]), full[b, :n], rtol=1e-4, atol=1e-4)
        last = dec.forward(cache, dec.embed(ids[:, :13]), torch.zeros(3, dtype=torch.long), last=torch.tensor(prompt) - 1)
        torch.testing.assert_close(dec.logits(last[:, 0]), full[torch.arange(3), torch.tensor(prompt) - 1],
                                   rtol=1e-4, atol=1e-4)
        # continue every row from its own length, 4 tokens each (overwriting the padding)
        starts = torch.tensor(prompt)
        step = torch.stack([ids[b, n:n + 4] for b, n in enumerate(prompt)])
        hidden = dec.forward(cache, dec.embed(step), starts)
        for b, n in enumerate(prompt):
            torch.testing.assert_close(dec.logits(hidden[b]), full[b, n:n + 4], rtol=1e-4, atol=1e-4)
        # roll back: row 1 keeps only 1 of its 4 new tokens, then continues from there
        starts = torch.tensor([prompt[0] + 4, prompt[1] + 1, prompt[2] + 4])
        step = torch.stack([ids[b, s:s + 2] for b, s in enumerate(starts.tolist())])
        hidden = dec.forward(cache, dec.embed(step), starts)
        for b, s in enumerate(starts.tolist()):
            torch.testing.assert_close(dec.logits(hidden[b]), full[b, s:s + 2], rtol=1e-4, atol=1e-4)


def test_compaction_moves_a_rows_cache_with_it():
    torch.manual_seed(1)
    model = MODELS["llama"]().eval()
    ids = torch.randint(0, SIZES["vocab_size"], (2, 12))
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        dec, cache = with_cache(LeanDecoder(model.model, model.lm_head, model.config, "cpu", torch.float32), 2, 16)
        dec.forward(cache, dec.embed(ids[:, :8]), torch.zeros(2, dtype=torch.long))
        cache.move([1], [0])  # row 0 finished: row 1 moves into slot 0
        hidden = dec.forward(cache, dec.embed(ids[1:, 8:10]), torch.tensor([8]))
        torch.testing.assert_close(dec.logits(hidden[0]), full[1, 8:10], rtol=1e-4, atol=1e-4)


def test_a_model_drafter_never_proposes_the_image_token():
    drafter = ModelDrafter.__new__(ModelDrafter)
    drafter.banned = torch.tensor([4])
    drafter.generator = torch.Generator().manual_seed(0)
    logits = torch.zeros(3, 10)
    logits[:, 4] = 50.0  # the image token is by far the drafter's favourite
    tokens, _ = drafter._next(logits.clone(), SamplingParams())
    assert 4 not in tokens.tolist()
    tokens, probs = drafter._next(logits.clone(), SamplingParams(temperature=1.0))
    assert 4 not in tokens.tolist() and probs[:, 4].eq(0).all()


@pytest.mark.parametrize("family", ["mllama", "florence2"])
def test_cross_attention_and_encoder_decoder_models_are_refused_before_loading(tmp_path, family):
    """Neither puts image tokens into a decoder-only sequence: refused with one line naming the reason and the hf
    backend, from the config alone (no weights are read)."""
    from transformers import Florence2Config, MllamaConfig

    from engine.model import LoadedModel

    (MllamaConfig if family == "mllama" else Florence2Config)().save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        LoadedModel(str(tmp_path), "cpu", torch.float32)
    message = str(e.value)
    assert "\n" not in message and "decoding.backend: hf" in message
    assert ("cross-attention" if family == "mllama" else "encoder-decoder") in message


@pytest.mark.parametrize("shape", [(1, 1, 384), (64, 1, 384), (82, 33, 384), (128, 5, 64), (3, 7, 3584)])
def test_rms_norm_in_one_kernel_is_transformers_norm_bit_for_bit(shape):
    """engine/decoder.py's _rms_norm on bf16 input (F.rms_norm without casts around it) against LlamaRMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from engine.decoder import _rms_norm

    torch.manual_seed(shape[-1])
    norm = LlamaRMSNorm(shape[-1], eps=1e-6).to(torch.bfloat16)
    norm.weight.data = torch.randn(shape[-1]).to(torch.bfloat16)
    for scale in (1e-3, 1.0, 30.0):
        x = (torch.randn(*shape) * scale).to(torch.bfloat16)
        assert torch.equal(_rms_norm(x, norm.weight.data, 1e-6), norm(x))
