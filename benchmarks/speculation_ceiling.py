"""How much speculation can gain on these rows at all: the engine with a free, perfect drafter, against plain
decoding and against prefill alone, in one run.

    python benchmarks/speculation_ceiling.py [--rows 256] [--batch 64] [--repeats 3] [--task caption]

The oracle drafter knows each row's answer (the target's own greedy output, from a first plain run) and proposes
its next k tokens at no cost: every draft is accepted and drafting takes no time. No real drafter does better, so
its speed is the ceiling of what any drafter (a better model, one that learns during the job, any k policy) can
reach on these rows, this model and this machine. "prefill only" generates one token per row (the tower, the
prompt's prefill and the first token): what is left when decoding costs nothing.

Rows are the held-out demo rows (the demo config's mix of caption, vqa, position and ocr questions), greedy, max 64
new tokens, float32 (`dtype: auto` on a CPU without native bf16), batch 64 as in the demo config. Variants run
interleaved, `--repeats` times; medians. Every speculative run must give the plain run's tokens (checked).
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.engine import SpecEngine  # noqa: E402
from engine.ngram_drafter import NgramDrafter  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from training.heldout import heldout_requests  # noqa: E402


def row_key(prompt: list[int], arrays: dict) -> tuple:
    """A row as the drafter sees it at admission: its prompt ids and its image bytes."""
    digest = hashlib.sha1()
    for name in sorted(arrays):
        digest.update(arrays[name].tobytes())
    return tuple(prompt), digest.hexdigest()


class OracleDrafter(NgramDrafter):
    """Proposes the next k tokens of each row's known answer (its tokens, then EOS where the row stopped)."""

    def __init__(self, answers: dict[tuple, list[int]], **kw):
        super().__init__(**kw)
        self.answers = answers

    def fork(self) -> "OracleDrafter":
        return OracleDrafter(self.answers, banned=self.banned, device=self.device,
                             image_token_id=self.image_token_id, limit=self.limit)

    def admit(self, first: int, prompts: list[list[int]], arrays) -> None:
        for i, (p, a) in enumerate(zip(prompts, arrays)):
            self.prompts[first + i] = self.answers[row_key(p, a)]

    def propose(self, histories: list[list[int]], k: int, params: SamplingParams):
        drafts = torch.zeros(len(histories), k, dtype=torch.long)
        num = torch.zeros(len(histories), dtype=torch.long)
        for i, h in enumerate(histories):
            found = self.prompts[i][len(h):len(h) + k]
            drafts[i, :len(found)] = torch.tensor(found, dtype=torch.long)
            num[i] = len(found)
        return drafts, num, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--task", choices=["caption", "vqa", "position", "ocr"], help="only this task's rows (caption: "
                    "the longest answers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = Path(args.models)
    from engine.processor import load_processor

    requests = heldout_requests(load_processor(str(models / "target")), args.rows, task=args.task)
    params = SamplingParams(max_new_tokens=64)

    def engine(drafter: str | None, k="auto") -> SpecEngine:
        return SpecEngine(EngineConfig(str(models / "target"), drafter, dtype="auto", max_batch_size=args.batch,
                                       num_draft_tokens=k))

    plain = engine(None)
    reference = [r.token_ids for r in run(plain, requests, args.batch, params)[0]]
    eos = min(plain.target.eos_ids)
    answers = {row_key(r.input_ids, r.model_inputs): ref + ([eos] if len(ref) < params.max_new_tokens else [])
               for r, ref in zip(requests, reference)}
    variants = {"plain": (plain, params), "prefill only (1 token)": (plain, SamplingParams(max_new_tokens=1))}
    for label, spec in [("VLM drafter", models / "drafter-vlm"), ("text drafter", models / "drafter-text")]:
        variants[label] = (engine(str(spec)), params)
    for k in ("auto", 4, 8):
        e = engine("ngram", k)
        e.drafter = OracleDrafter(answers, banned=e.drafter.banned, image_token_id=e.drafter.image_token_id,
                                  limit=e.drafter.limit)
        variants[f"oracle drafter, k={k}"] = (e, params)
    times: dict[str, list[float]] = {v: [] for v in variants}
    stats: dict[str, tuple] = {}
    for e, p in variants.values():
        run(e, requests[:args.batch], args.batch, p)  # warm-up
    for _ in range(args.repeats):
        for label, (e, p) in variants.items():
            before = (e.stats.drafted, e.stats.accepted, e.stats.row_rounds)
            out, seconds = run(e, requests, args.batch, p)
            times[label].append(seconds)
            if p is params and [r.token_ids for r in out] != reference:
                raise SystemExit(f"{label}: output differs from plain decoding")
            st = e.stats
            drafted, accepted, row_rounds = (st.drafted - before[0], st.accepted - before[1],
                                             st.row_rounds - before[2])
            stats[label] = (sum(r.num_output_tokens for r in out), accepted / drafted if drafted else None,
                            sum(r.num_output_tokens for r in out) / row_rounds if row_rounds else None)
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"{len(requests)} held-out rows ({args.task or 'all tasks'}), batch {args.batch}, {plain.dtype}, "
          f"{args.threads} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}; medians of {args.repeats} "
          "interleaved runs")
    print(f"{'variant':26} {'seconds':>8} {'tok/s':>8} {'vs plain':>9} {'acceptance':>11} {'tok/round':>10}")
    tokens = stats["plain"][0]
    for v in variants:
        n, acc, per_round = stats[v]
        print(f"{v:26} {med[v]:8.2f} {n / med[v]:8.1f} {med['plain'] / med[v]:8.2f}x "
              f"{'' if acc is None else f'{acc:.3f}':>11} {'' if per_round is None else f'{per_round:.2f}':>10}")
    ceiling = min(med[v] for v in variants if v.startswith("oracle"))
    print(f"the VLM drafter (k auto) reaches {ceiling / med['VLM drafter']:.2f} of the oracle's best speed, the text "
          f"drafter {ceiling / med['text drafter']:.2f}, plain decoding {ceiling / med['plain']:.2f}")
    print(f"decoding is {1 - med['prefill only (1 token)'] / med['plain']:.0%} of plain's time "
          f"({tokens / len(requests):.1f} tokens per row); no drafter can make these rows more than "
          f"{med['plain'] / med['prefill only (1 token)']:.2f}x faster than plain decoding")


def run(engine: SpecEngine, requests, batch: int, params: SamplingParams):
    t = time.perf_counter()
    out = []
    for i in range(0, len(requests), batch):
        out += engine.generate(requests[i:i + batch], params)
    return out, time.perf_counter() - t


if __name__ == "__main__":
    main()
