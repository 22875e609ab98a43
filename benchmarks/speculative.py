"""The speculative engine against Hugging Face generation, in one run, on the same held-out rows.

    python benchmarks/speculative.py [--rows 192] [--device cpu|cuda] [--threads 2] [--models models] [--dtype auto]

Rows are the test split's (a mix of caption, vqa, position and ocr questions), greedy, max 64 new tokens.
Prints tokens/s for:
  - HF `model.generate` at batch 1 and 16, in float32 and bfloat16 (the baseline is the faster of the two);
  - HF assisted generation (the text-only drafter as assistant) at batch 1, the only batch size it accepts;
  - specray without speculation, and with each drafter (VLM, text-only, n-gram), at batch 1, 16 and 64, in the
    dtype a job would use (`--dtype auto`: bf16 on CUDA and on CPUs with native bf16, float32 otherwise);
and for each specray run: the ratio to HF at the same batch (batch 64 against HF's batch 16), the same ratio for
the decode phase alone (HF's prefill measured by the same calls with max_new_tokens=1), the mean number
of tokens per row per round (1.0 without speculation), where the time goes, and how many rows match the
float32 HF output exactly (bf16 arithmetic may flip near-ties; with float32 the engine is exact, see tests).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.engine import SpecEngine  # noqa: E402
from engine.hf_backend import HFBackend  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from training.heldout import heldout_requests  # noqa: E402

PARAMS = SamplingParams(max_new_tokens=64)


def tokens(results) -> int:
    return sum(r.num_output_tokens for r in results)


def run_hf(backend: HFBackend, requests, batch: int, params: SamplingParams = PARAMS):
    backend.generate(requests[:batch], params)  # warm-up
    t = time.perf_counter()
    out = []
    for i in range(0, len(requests), batch):
        out += backend.generate(requests[i:i + batch], params)
    return out, time.perf_counter() - t


def run_assisted(models: Path, requests, device: str):
    """HF assisted generation, batch 1: target fp32 on CPU (bf16 on GPU), the text-only drafter as assistant."""
    from transformers import AutoModelForCausalLM

    hf = HFBackend(EngineConfig(str(models / "target"), backend="hf"), device=device)  # fp32 on CPU, bf16 on CUDA
    dtype = hf.dtype
    assistant = AutoModelForCausalLM.from_pretrained(models / "drafter-text", dtype=dtype).to(device).eval()
    n_out = 0
    t = time.perf_counter()
    for r in requests:
        inputs = hf._batch_inputs([r])
        out = hf.model.generate(**inputs, assistant_model=assistant, max_new_tokens=PARAMS.max_new_tokens,
                                do_sample=False, pad_token_id=hf.pad_id)
        n_out += hf._result(out[0, inputs["input_ids"].shape[1]:].tolist(), PARAMS).num_output_tokens
    return n_out, time.perf_counter() - t


def run_engine(engine: SpecEngine, requests, batch: int):
    engine.max_batch = batch
    engine.generate(requests[:batch], PARAMS)  # warm-up (allocation, first calls)
    engine.stats = type(engine.stats)()
    engine.policy = type(engine.policy)(engine.policy.fixed, max_k=engine.max_k)
    t = time.perf_counter()
    out = engine.generate(requests, PARAMS)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="the specray runs' dtype; auto: what a job gets (bf16 on CUDA and native-bf16 CPUs, else float32)")
    ap.add_argument("--k", default="auto", help="num_draft_tokens for the specray runs (int or auto)")
    ap.add_argument("--task", choices=["caption", "vqa", "position", "ocr"], help="only this task's rows")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = Path(args.models)
    from engine.processor import load_processor

    requests = heldout_requests(load_processor(str(models / "target")), args.rows, task=args.task)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# {args.rows} test-split rows ({args.task or 'all tasks'}), greedy, max {PARAMS.max_new_tokens} new tokens; device {args.device} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); torch {torch.__version__}")
    figures: dict = {"rows": args.rows, "device": args.device, "hf": {}, "specray": {}}

    hf_best: dict[int, float] = {}
    hf_decode: dict[int, float] = {}
    reference = None
    for dtype in (torch.float32, torch.bfloat16):
        hf = HFBackend(EngineConfig(str(models / "target"), backend="hf", dtype=str(dtype).split(".")[1]),
                       device=args.device)
        for b in (16, 1):  # batch 16 first: its float32 output is the reference for the agreement columns
            out, wall = run_hf(hf, requests, b)
            if dtype == torch.float32 and b == 16:
                reference = [r.text for r in out]
            tps = tokens(out) / wall
            # the same call with one new token is the prefill (plus one step): what remains is the decode phase
            _, prefill = run_hf(hf, requests, b, SamplingParams(max_new_tokens=1))
            decode_tps = (tokens(out) - len(out)) / max(wall - prefill, 1e-9)
            if tps > hf_best.get(b, 0.0):
                hf_best[b], hf_decode[b] = tps, decode_tps
            figures["hf"][f"{dtype}".split(".")[1] + f"_b{b}"] = {"tokens_per_s": tps, "decode_tokens_per_s": decode_tps,
                                                                   "prefill_share": prefill / wall}
            agree = "" if dtype == torch.float32 else \
                f"; {sum(a.text == r for a, r in zip(out, reference))}/{len(out)} rows = hf fp32"
            print(f"hf generate      {str(dtype).split('.')[1]:8s} batch {b:3d}: {tps:8.1f} tokens/s  ({wall:.1f}s; "
                  f"prefill {prefill / wall:.0%}; decode phase {decode_tps:.1f} tokens/s{agree})")
        del hf
    try:
        n_out, wall = run_assisted(models, requests, args.device)
        figures["hf"]["assisted_b1"] = n_out / wall
        print(f"hf assisted      text drafter batch   1: {n_out / wall:8.1f} tokens/s  "
              f"({n_out / wall / hf_best[1]:.2f}x hf)")
    except Exception as e:  # noqa: BLE001 - report why the public baseline cannot run
        figures["hf"]["assisted_b1"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        print(f"hf assisted      batch 1: FAILED ({type(e).__name__}: {str(e)[:160]})")

    k = args.k if args.k == "auto" else int(args.k)
    print(f"\n{'specray':10s} {'drafter':8s} {'batch':>5s} {'tokens/s':>9s} {'vs hf':>6s} {'decode vs hf':>12s} "
          f"{'tok/round':>9s} {'k used':>7s} {'prefill':>7s} {'draft':>6s} {'verify':>6s} {'accept':>6s} {'=hf fp32':>8s}")
    for name, drafter in (("none", None), ("vlm", models / "drafter-vlm"), ("text", models / "drafter-text"),
                          ("ngram", "ngram")):
        engine = SpecEngine(EngineConfig(str(models / "target"), str(drafter) if drafter else None, dtype=args.dtype,
                                         num_draft_tokens=k), device=args.device)
        for b in batches:
            out, wall = run_engine(engine, requests, b)
            st = engine.stats
            tps = tokens(out) / wall
            base = hf_best[min(b, 16)]
            decode_tps = (tokens(out) - len(out)) / max(wall - st.prefill_s, 1e-9)
            decode_ratio = decode_tps / hf_decode[min(b, 16)]
            spent = st.prefill_s + st.draft_s + st.verify_s + st.accept_s
            share = {p: getattr(st, f"{p}_s") / spent for p in ("prefill", "draft", "verify", "accept")}
            same = sum(a.text == r for a, r in zip(out, reference))
            hist = engine.policy.history
            k_used = sum(hist) / len(hist) if hist else 0.0
            figures["specray"][f"{name}_b{b}"] = {
                "tokens_per_s": tps, "vs_hf": tps / base, "decode_vs_hf": decode_ratio, "tokens_per_row_round": st.as_dict()["tokens_per_row_round"],
                "mean_k": k_used, "acceptance": st.accepted / st.drafted if st.drafted else None,
                "time_share": share, "wall_s": wall, "unaccounted_s": wall - spent, "same_as_hf_fp32": same}
            print(f"{'':10s} {name:8s} {b:5d} {tps:9.1f} {tps / base:5.2f}x {decode_ratio:11.2f}x "
                  f"{st.as_dict()['tokens_per_row_round']:9.2f} "
                  f"{k_used:7.2f} {share['prefill']:7.0%} {share['draft']:6.0%} {share['verify']:6.0%} "
                  f"{share['accept']:6.0%} {same:4d}/{len(out)}")
        del engine
    # the exact mode: float32, where greedy output must equal HF float32's row for row
    engine = SpecEngine(EngineConfig(str(models / "target"), str(models / "drafter-vlm"), dtype="float32",
                                     num_draft_tokens=k), device=args.device)
    out, wall = run_engine(engine, requests, 16)
    same = sum(a.text == r for a, r in zip(out, reference))
    figures["specray"]["vlm_b16_float32"] = {"tokens_per_s": tokens(out) / wall, "same_as_hf_fp32": same}
    print(f"{'float32':10s} {'vlm':8s} {16:5d} {tokens(out) / wall:9.1f} {tokens(out) / wall / hf_best[16]:5.2f}x "
          f"{'':12s} {'':9s} {'':7s} {'':7s} {'':6s} {'':6s} {'':6s} {same:4d}/{len(out)}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
