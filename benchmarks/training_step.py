"""The model pair's training steps with the decoder on length groups (training/length_groups.py) against the
padded batch, measured in the same run: each recipe stage's step (its batch size, task mix, token dropout and
attention supervision as configs/modelpair_qwen.yaml sets them) on the shipped models, interleaved rounds, median.

    python benchmarks/training_step.py [--steps 6] [--rounds 3]

The learning rate is 1e-9: the weights stay as shipped, so every round times the same work."""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.attention_supervision import AttentionSupervision  # noqa: E402
from training.optim import uses_bf16  # noqa: E402
from training.token_dropout import TokenDropout  # noqa: E402
from training.train import (ATTEND_OFFSET, Batcher, architecture, attend_passes, freeze_tower,  # noqa: E402
                            ground_truth_batches, image_side, load_config, shallow_spec, train_model)


def stages(cfg: dict, models: Path):
    """(name, model, tower frozen (None: no tower), batches, dropout, attend) per recipe stage: the shipped models
    (the 2-layer target built as the recipe builds it) on ground-truth rows (the drafters train on the target's
    answers, of like lengths)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from engine.processor import load_processor

    processor = load_processor(str(models / "target"))
    train = cfg["train"]
    tc, ac, fc = train["target"], train["attend"], train["drafter"]
    target = AutoModelForImageTextToText.from_pretrained(models / "target").float()
    attend = AttentionSupervision(ac)
    rows = ground_truth_batches(Batcher(processor), ac["batch_size"], start=ATTEND_OFFSET,
                                task_mix=ac["task_mix"], asked_side=image_side(cfg))
    target_rows = [next(ground_truth_batches(Batcher(processor), tc["batch_size"], start=i * tc["batch_size"],
                                             task_mix=tc["task_mix"])) for i in range(8)]
    _, vlm, _ = architecture(cfg, processor.tokenizer)  # the stage's first part, built as the recipe builds it
    depth = tc.get("shallow_layers") or cfg["target"]["text"]["num_hidden_layers"]
    shallow = vlm(shallow_spec(cfg["target"], depth))
    out = [(f"target, {depth} layers (tower frozen)", shallow, True, target_rows,
            lambda: TokenDropout(tc.get("token_dropout"), 0), None),
           ("target, grown (tower frozen)", target, True, target_rows,
            lambda: TokenDropout(tc.get("token_dropout"), 0), None)]
    for name, pc, seed in attend_passes(ac, 0):
        out.append((name, target, False, [next(rows) for _ in range(8)], lambda pc=pc, seed=seed:
                    TokenDropout(pc.get("token_dropout"), seed), attend))
    drafter_vlm = AutoModelForImageTextToText.from_pretrained(models / "drafter-vlm").float()
    drafter_text = AutoModelForCausalLM.from_pretrained(models / "drafter-text").float()
    for name, model, with_image in (("drafter-vlm (tower frozen)", drafter_vlm, True),
                                    ("drafter-text", drafter_text, False)):
        batches = [next(ground_truth_batches(Batcher(processor, with_image), fc["batch_size"],
                                             start=i * fc["batch_size"], task_mix=tc["task_mix"]))
                   for i in range(8)]
        if not with_image:
            batches = [{k: b[k] for k in ("input_ids", "attention_mask", "labels")} for b in batches]
        out.append((name, model, True if with_image else None, batches, lambda: TokenDropout(None, 0), None))
    return out


def timed(model, batches, steps: int, dropout, attend, bf16: bool, by_length: bool) -> float:
    """Seconds a step, over `steps` steps of the batches (cycled)."""
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its own log line
        train_model(model, iter(batches * (steps // len(batches) + 1)), steps, 1e-9, 1, "bench",
                    dropout=dropout, attend=attend, bf16=bf16, by_length=by_length)
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "modelpair_qwen.yaml"))
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--steps", type=int, default=6, help="steps per timing")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    torch.set_num_threads(cfg["train"]["threads"])
    bf16 = uses_bf16(cfg["train"].get("precision", "auto"), "cpu")
    print(f"precision: {'bf16 autocast' if bf16 else 'float32'}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps x {args.rounds} interleaved rounds, median")
    print("| step | padded (s) | length groups (s) | ratio | padding in the batch |")
    print("|---|---|---|---|---|")
    for name, model, frozen, batches, dropout, attend in stages(cfg, Path(args.models)):
        if frozen is not None:
            freeze_tower(model, frozen)
        masks = torch.cat([b["attention_mask"].flatten() for b in batches])
        times = {False: [], True: []}
        timed(model, batches, 2, dropout(), attend, bf16, True)  # warm up
        for _ in range(args.rounds):
            for by_length in (False, True):
                times[by_length].append(timed(model, batches, args.steps, dropout(), attend, bf16, by_length))
        padded, grouped = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {padded:.3f} | {grouped:.3f} | {padded / grouped:.2f}x | "
              f"{1 - masks.float().mean():.0%} |", flush=True)


if __name__ == "__main__":
    main()
