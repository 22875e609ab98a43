"""Which rows enter the engine's slots, and when: the queue of a `generate` call and its admission rule. The
engine (engine/engine.py) runs the rounds; this file only decides who is decoded.

- Rows that cannot be decoded (an empty prompt, or one whose prompt and max_new_tokens exceed the model's
  positions) get their error result at once and never enter the queue.
- A group's free slots are filled in groups, not one by one: a prefill call per freed slot would pay the vision
  tower's and the decoder's fixed costs per row, while waiting until a quarter of the slots are free costs a few
  rounds (an empty group is filled at once).
- Rows admitted together are prefilled in chunks of at most PREFILL_TOKENS prompt tokens (a longer row alone):
  a prefill's activations ([tokens, intermediate] per layer) then stay in a CPU's caches, so a group of many
  slots fills as fast per row as a small one (the shipped pair, bf16: 256 rows in one forward prefilled 1.5x
  slower than in chunks of 64).
"""
from __future__ import annotations

from engine.request import Request, SamplingParams, error_result
from engine.sequence import Sequence, SequenceGroup

PREFILL_TOKENS = 4096  # prompt tokens per prefill forward


def prefill_chunks(rows: list[Sequence]) -> list[list[Sequence]]:
    """Rows to admit, in chunks of at most PREFILL_TOKENS prompt tokens (a row longer than that alone)."""
    chunks, tokens = [[]], 0
    for s in rows:
        if chunks[-1] and tokens + s.prompt_len > PREFILL_TOKENS:
            chunks.append([])
            tokens = 0
        chunks[-1].append(s)
        tokens += s.prompt_len
    return chunks


class Scheduler:
    def __init__(self, requests: list[Request], params: SamplingParams, max_positions: int | None, results: list,
                 cache_positions: int | None = None, headroom: int = 0):
        """The requests to decode, queued last first (pop() admits in request order); the others' error results
        go into `results`. `cache_positions`: a KV cache sized once holds that many positions a row, of which a
        row needs its prompt, max_new_tokens and `headroom` (a round's drafts)."""
        self.queue: list[Sequence] = []
        for i, r in enumerate(requests):
            need = len(r.input_ids) + params.max_new_tokens
            if len(r.input_ids) == 0:
                results[i] = error_result("empty prompt")
            elif max_positions and need > max_positions:
                results[i] = error_result(f"prompt ({len(r.input_ids)} tokens) + max_new_tokens "
                                          f"({params.max_new_tokens}) exceeds the model's {max_positions} positions")
            elif cache_positions and need + headroom > cache_positions:
                results[i] = error_result(f"prompt ({len(r.input_ids)} tokens) + max_new_tokens "
                                          f"({params.max_new_tokens}) + {headroom} for drafts exceeds the KV cache's "
                                          f"{cache_positions} positions a row (decoding.kv_cache_gb)")
            else:
                self.queue.append(Sequence(i, r, len(r.input_ids)))
        self.queue.reverse()

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def longest_prompt(self) -> int:
        return max(s.prompt_len for s in self.queue)

    def admissions(self, group: SequenceGroup) -> list[list[Sequence]]:
        """The rows that enter `group`'s free slots now, in prefill chunks (none: not yet)."""
        free, queue = group.slots - len(group.active), self.queue
        if not (queue and free and (not group.active or free >= min(max(1, group.slots // 4), len(queue)))):
            return []
        return prefill_chunks([queue.pop() for _ in range(min(free, len(queue)))])
