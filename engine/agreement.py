"""Teacher-forced token agreement: how closely a (compressed) model follows a reference's output. Per row, how many
of the reference's tokens the model picks greedily when fed the reference's own prefix, free of the cascade that
one early difference causes in free-running output (where the outputs end is left to exact-match agreement).
What `compression.evaluate` reports (actors/generate_actor.py) and benchmarks/compression.py measures."""
from __future__ import annotations

import torch

from engine.model import LoadedModel
from engine.request import Request


@torch.inference_mode()
def token_agreement(model: LoadedModel, requests: list[Request], references: list[list[int]],
                    batch: int = 16) -> list[int]:
    """Per request, the reference tokens `model` picks when teacher-forced; on a cache of its own."""
    dec, device, out = model.decoder, model.device, [0] * len(requests)
    for j in range(0, len(requests), batch):
        reqs, refs = requests[j:j + batch], [list(r) for r in references[j:j + batch]]
        pe = model.embed_prompts([r.input_ids for r in reqs], [r.model_inputs for r in reqs])
        n = len(reqs)
        lengths = torch.tensor(pe.lengths, device=device)
        cache = dec.new_cache()
        cache.allocate(n, max(pe.lengths) + max(map(len, refs)) + 1)
        first = dec.logits(model.prefill(cache, pe, last=lengths - 1)[:, 0]).argmax(-1)  # [n]
        width = max(1, max(map(len, refs)) - 1)
        feed = torch.zeros(n, width, dtype=torch.long, device=device)
        for i, ref in enumerate(refs):  # the reference's own tokens, fed back (the last is never fed)
            feed[i, :max(0, len(ref) - 1)] = torch.tensor(ref[:-1], dtype=torch.long)
        picks = dec.logits(dec.forward(cache, dec.embed(feed), lengths)).argmax(-1)  # [n, width]
        for i, ref in enumerate(refs):
            got = torch.cat([first[i:i + 1], picks[i, :len(ref) - 1]])[:len(ref)]
            out[j + i] = int((got == torch.tensor(ref, dtype=torch.long, device=device)).sum())
    return out
