"""Batched acceptance: the greedy rule, the sampling rule's distribution (chi-square over >=1e5 draws), and the
Triton kernel (run by Triton's interpreter on CPU) against the torch reference, draw for draw."""
from __future__ import annotations

import pytest
import torch

from kernels.acceptance import greedy_accept, rejection_sample
from tests.conftest import run_under_triton_interpreter


def test_greedy_accepts_the_matching_prefix_and_adds_the_targets_token():
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 2, 3], [4, 4, 4]])
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [0, 2, 3, 1], [4, 4, 4, 9]])
    num = torch.tensor([3, 3, 3, 2])  # the last row drafted only two tokens
    accepted, nxt = greedy_accept(drafts, num, target)
    assert accepted.tolist() == [3, 1, 0, 2]
    assert nxt.tolist() == [8, 6, 0, 4]


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs.double() * n
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor((probs > 0).sum().item() - 1, dtype=torch.float64)
    return torch.special.gammaincc(df / 2, stat / 2).item()  # survival function of chi2(df)


def _emitted(accepted, nxt, drafts, position):
    """The token each row emits at `position` (drafts while accepted, then the extra token); -1 if it stops before."""
    out = torch.full_like(nxt, -1)
    if position < drafts.shape[1]:
        at_draft = accepted > position
        out[at_draft] = drafts[at_draft, position]
    out[accepted == position] = nxt[accepted == position]
    return out


def _setup(n, v=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, v, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(k, v, generator=g) * 1.5, -1)
    p[0, 3] = 0  # a token the target never emits, but the drafter proposes
    p[0] /= p[0].sum()
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(k)], 1)
    return (p, q, drafts, torch.rand(n, k, generator=g), torch.rand(n, generator=g))


@pytest.mark.parametrize("with_q", [True, False])
def test_rejection_sampling_keeps_the_target_distribution(with_q):
    n, k = 200_000, 3
    p, q, drafts, u, ru = _setup(n, k=k)
    if not with_q:  # a deterministic drafter always proposes the same tokens (the target's modes): q is one-hot
        drafts = p[:k].argmax(-1)[None].expand(n, k).contiguous()
    accepted, nxt = rejection_sample(drafts, q.expand(n, -1, -1) if with_q else None, p.expand(n, -1, -1),
                                     torch.full((n,), k), u, ru)
    for position in range(k + 1):
        tokens = _emitted(accepted, nxt, drafts, position)
        tokens = tokens[tokens >= 0]
        assert len(tokens) > 1000
        counts = torch.bincount(tokens, minlength=p.shape[1])
        assert counts[p[position] == 0].sum() == 0
        assert _chi2_pvalue(counts[p[position] > 0], p[position][p[position] > 0]) > 1e-4, position


def test_the_chi_square_check_catches_a_biased_rule():
    """Resampling from p instead of the residual max(0, p - q) over-weights the drafter's tokens: detected."""
    n, k = 200_000, 1
    p, q, drafts, u, ru = _setup(n, k=k)
    accept = u[:, 0] * q[0, drafts[:, 0]] <= p[0, drafts[:, 0]]
    wrong = torch.where(accept, drafts[:, 0], torch.multinomial(p[0], n, replacement=True))
    assert _chi2_pvalue(torch.bincount(wrong, minlength=8)[p[0] > 0], p[0][p[0] > 0]) < 1e-6


def test_rows_with_fewer_drafts_and_full_acceptance_take_the_bonus_distribution():
    v = 5
    p = torch.zeros(2, 3, v)
    p[:, 0, 1] = 1.0  # the target is certain about the first draft
    p[:, 1, 2] = 1.0
    p[:, 2, 4] = 1.0
    drafts = torch.tensor([[1, 2], [1, 3]])
    accepted, nxt = rejection_sample(drafts, None, p, torch.tensor([2, 1]), torch.rand(2, 2), torch.rand(2))
    assert accepted.tolist() == [2, 1]  # row 1 drafted one token only
    assert nxt.tolist() == [4, 2]


KERNEL_CHECK = r"""
import torch
from kernels import acceptance, acceptance_triton
for v, k, n, with_q, block_b, block_v in [(8, 3, 4096, True, 512, 8), (8, 3, 4096, False, 512, 8),
                                         (300, 4, 256, True, 16, 64), (37, 1, 300, False, 32, 16)]:
    g = torch.Generator().manual_seed(v * 10 + k)
    p = torch.softmax(torch.randn(n, k + 1, v, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(n, k, v, generator=g) * 2, -1)
    drafts = torch.multinomial(q.reshape(-1, v), 1, generator=g).reshape(n, k)
    if not with_q:
        drafts = p[:, :k].argmax(-1).where(torch.rand(n, k, generator=g) < 0.7, drafts)
    num = torch.randint(0, k + 1, (n,), generator=g)
    u, ru = torch.rand(n, k, generator=g), torch.rand(n, generator=g)
    qq = q if with_q else None
    ref = acceptance.rejection_sample(drafts, qq, p, num, u, ru)
    got = acceptance_triton.rejection_sample(drafts, qq, p, num, u, ru, block_b=block_b, block_v=block_v)
    assert torch.equal(ref[0].int(), got[0]), (v, k)
    mismatch = (ref[1] != got[1]).float().mean().item()
    assert mismatch <= 1e-3, (v, k, mismatch)  # float summation order may move a draw sitting on a CDF boundary
    assert 0 < ref[0].float().mean() < k
print("ok")
"""


def test_triton_kernel_matches_the_reference_under_the_interpreter():
    run_under_triton_interpreter(KERNEL_CHECK)
