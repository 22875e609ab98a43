"""Carry a trained model over to a new tokenizer (python -m training.train ... --adapt-from DIR): every weight but
the token embedding is copied as it is; each token of the new vocabulary takes the embedding of the same string
in the old one, or of the old token that played its part (the image placeholder, the end of a turn, padding),
or the old vocabulary's mean. The model then trains on in its new prompt format (the recipe's attend stage).

This is how the shipped pair moved to Qwen2.5-VL's own tokens and chat template: the same BPE text tokens (the
new ids shifted by the extra special tokens), <|image_pad|> from <image>, <|im_end|> from </s>, and a start of
line ("Yes" after "assistant\\n") from the old start of an answer (" Yes" after "ASSISTANT:").
"""
from __future__ import annotations

import torch

# new special token -> the old (LLaVA-style) token whose part it takes
STAND_INS = {"<|image_pad|>": "<image>", "<|im_end|>": "</s>", "<|endoftext|>": "<pad>", "<|im_start|>": "<s>"}
SPACE = "\u0120"  # byte-level BPE's mark of a leading space


def embedding_sources(old_vocab: dict[str, int], new_vocab: dict[str, int]) -> dict[int, int]:
    """{new id: old id} for every new token with a counterpart in the old vocabulary (the rest: the mean)."""
    out = {}
    for token, new in new_vocab.items():
        for cand in (token, STAND_INS.get(token), SPACE + token):
            if cand is not None and cand in old_vocab:
                out[new] = old_vocab[cand]
                break
    return out


@torch.no_grad()
def retokenized(old, new, old_vocab: dict[str, int], new_vocab: dict[str, int]) -> dict:
    """Copy `old`'s weights into `new` (the same architecture but for its vocabulary size), the embedding (and an
    untied head) row by row as embedding_sources maps them. Returns {mapped, mean}: how many rows each way."""
    old_state, new_state = old.state_dict(), new.state_dict()
    sources = embedding_sources(old_vocab, new_vocab)
    rows = torch.tensor(sorted(sources)), torch.tensor([sources[i] for i in sorted(sources)])
    for name, tensor in new_state.items():
        src = old_state[name]
        if src.shape == tensor.shape:
            tensor.copy_(src)
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):  # [vocab, hidden]
            tensor.copy_(src.float().mean(0, keepdim=True).to(tensor.dtype).expand_as(tensor))
            tensor[rows[0]] = src[rows[1]].to(tensor.dtype)
        else:
            raise ValueError(f"{name}: shape {tuple(src.shape)} in the old model, {tuple(tensor.shape)} in the new")
    return {"mapped": len(sources), "mean": len(new_vocab) - len(sources)}


def carried(model, folder, tokenizer) -> dict:
    """`model` (freshly built, the recipe's architecture and tokenizer) takes the weights of the model saved in
    `folder` (the same architecture; its own tokenizer there, mapped over as `retokenized` does). Returns its
    counts."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    auto = AutoModelForImageTextToText if hasattr(model.config, "vision_config") else AutoModelForCausalLM
    old = auto.from_pretrained(folder).float()
    return retokenized(old, model, AutoTokenizer.from_pretrained(folder).get_vocab(), tokenizer.get_vocab())
