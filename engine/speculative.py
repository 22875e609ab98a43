"""One speculative round for a group of sequences, top to bottom: draft, verify, accept, commit.

    draft    k tokens per row, requested from the group's drafter at the end of its last round (so that a
             drafter server drafts while the target verifies another group); collected here
    verify   the row's last token and its k drafts, k+1 positions per row, ONE target forward for the group
    accept   greedy: the longest prefix the target's argmax agrees with; sampling: the rejection rule that
             keeps the target's distribution (kernels/acceptance*.py); plus one token of the target's own
    commit   each row gains its accepted drafts and that token; the target's cache simply keeps the row's
             longer length (rejected positions are overwritten later); the drafter rolls back to the same prefix

Invariant per row: the target's cache holds the prompt and every generated token but the last, which is fed
at the start of the next round. Rows accept different numbers of tokens and simply carry different lengths.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.device_io import Span, readback, upload
from engine.request import SamplingParams
from engine.sampling import warp
from engine.sequence import SequenceGroup
from kernels.acceptance import greedy_accept
from kernels.acceptance import rejection_sample as rejection_sample_torch


@dataclass
class RoundRecord:
    """What one round cost and yielded: what the draft-length policy and the engine's stats learn from."""
    k: int
    draft_s: float  # drafter compute (for a drafter server, as it measured it)
    wait_s: float  # time the target waited for the drafts
    verify_s: float
    accept_s: float
    accepted: list[int]
    num_drafts: list[int]


def fit_width(draft_probs: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """A drafter's probabilities [n, k, V_draft] over the target's vocabulary [n, k, width]: zero-padded when the
    drafter's vocabulary is smaller (a prefix of the target's), cut when its logits are wider (the columns past
    the target's width are banned in the drafter, so they hold no probability)."""
    if draft_probs is None or draft_probs.shape[-1] == width:
        return draft_probs
    if draft_probs.shape[-1] > width:
        return draft_probs[..., :width]
    return torch.nn.functional.pad(draft_probs, (0, width - draft_probs.shape[-1]))


def request_drafts(group: SequenceGroup, k: int, params: SamplingParams) -> None:
    """Ask the group's drafter for k tokens per row (a local drafter drafts right away; k = 0: none)."""
    handle = group.drafter.submit([s.generated for s in group.active], k, params) if k > 0 else None
    group.pending = (k, handle)


def speculative_round(engine, group: SequenceGroup, params: SamplingParams) -> RoundRecord:
    """Draft, verify, accept and commit one round of `group` on `engine`'s target (engine/engine.py). The host
    waits for the device once: the packed readback of what each row accepted (engine/device_io.py)."""
    seqs, n, device, clock = group.active, len(group.active), engine.device, engine.clock

    # 1. draft: collect the k drafts per row requested at the end of the last round
    (k, handle), group.pending = group.pending, None
    t0 = time.perf_counter()
    draft_s = 0.0
    if handle is not None:
        drafts, num, q, draft_s = group.drafter.collect(handle)
        k = drafts.shape[1]  # 0 when a drafter server was lost and none could take over
    if handle is None or k == 0:
        drafts = torch.zeros(n, 0, dtype=torch.long, device=device)
        num, q = torch.zeros(n, dtype=torch.long, device=device), None
    wait_s = time.perf_counter() - t0  # a remote drafter's time not hidden (a local one's: its Span, below)

    # 2. verify: every row's last token and its drafts, k+1 positions per row, in one target forward; the
    # lengths come from the rows' own bookkeeping, so nothing is read from the device to size it
    v0 = clock.mark()
    starts = [s.prompt_len + len(s.generated) - 1 for s in seqs]
    up = upload([[s.generated[-1] for s in seqs], starts], device)
    tokens = torch.cat([up[0][:, None], drafts], 1)
    logits = engine.target_step(group.cache, tokens, up[1], length=max(starts) + k + 1)  # eager or compiled
    v1 = clock.mark()

    # 3. accept: how many drafts each row keeps, and the target's own next token
    if params.temperature == 0:
        accepted, nxt = greedy_accept(drafts, num, logits.argmax(-1))
    else:
        p = warp(logits, params)
        if k == 0:
            accepted = torch.zeros(n, dtype=torch.int32, device=device)
            nxt = torch.multinomial(p[:, 0], 1, generator=engine.rng).squeeze(1)
        else:
            u = torch.rand(n, k, generator=engine.rng, device=device)
            ru = torch.rand(n, generator=engine.rng, device=device)
            reject = rejection_sample_torch
            if device == "cuda":
                from kernels.acceptance_triton import rejection_sample as reject
            accepted, nxt = reject(drafts, fit_width(q, p.shape[-1]), p, num, u, ru)

    # 4. commit: the round's one wait for the device; rows gain their accepted drafts plus the target's token;
    # the drafter rolls back to match
    a1 = clock.mark()  # before the readback, which waits for it: a CUDA event is read only once it is done
    accepted_l, nxt_l, num_l, flat = readback(accepted, nxt, num, drafts)
    h1 = time.perf_counter()
    if isinstance(draft_s, Span):  # a local drafter drafted when asked: none of it was hidden
        draft_s = draft_s.seconds
        wait_s += draft_s
    if engine.capture_topk:  # the target's distribution at every position whose token the row keeps
        engine.keep_topk(seqs, logits, [a + 1 for a in accepted_l])
    for i, (s, a, t, m) in enumerate(zip(seqs, accepted_l, nxt_l, num_l)):
        s.drafted += m
        s.accepted += a
        engine.extend(s, flat[i * k:i * k + a] + [t], params)
    if k > 0:
        group.drafter.commit(accepted_l)
    commit_s = time.perf_counter() - h1  # the host's own work after the readback
    return RoundRecord(k, draft_s, wait_s, clock.seconds(v0, v1), clock.seconds(v1, a1) + commit_s, accepted_l, num_l)
