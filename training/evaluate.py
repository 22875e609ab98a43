"""Evaluate the shipped pair on the test split and write the model card:

    python -m training.evaluate models [--per-task 100]

Prints the target's exact-match accuracy per task, each drafter's greedy acceptance rate against the
target at k=4, and the cost of one decode step of each model relative to the target's (batch 1 and 16).

Greedy acceptance is computed exactly with one teacher-forced drafter forward per row: in a greedy
round the drafter's context equals the target's output prefix for as long as its proposals are accepted,
so drafted token t is accepted iff argmax(drafter | y[:t]) == y[t] and every earlier token of its round was.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from training import corpus
from training.modelpair import user_prompt

TEST_SEED = corpus.SPLIT_SEEDS["test"]


def heldout_requests(processor, n: int, start: int = 0, task: str | None = None) -> list:
    """n engine Requests from the test split (a mix of tasks unless `task` is given), one image each."""
    from engine.request import Request

    out = []
    for i in range(start, start + n):
        s = corpus.sample(TEST_SEED, i, task)
        enc = processor(text=[user_prompt(processor, s.question)], images=[s.image])
        out.append(Request(key=s.key, input_ids=[int(t) for t in enc["input_ids"][0]],
                           model_inputs={"pixel_values": np.asarray(enc["pixel_values"], dtype=np.float32)}))
    return out


@torch.inference_mode()
def generate_answers(model, processor, items: list[tuple], batch_size: int = 64, max_new_tokens: int = 64,
                     return_ids: bool = False):
    """Greedy answers of a VLM for (image, question) pairs, batched with left padding."""
    answers, ids_out = [], []
    tok = processor.tokenizer
    for j in range(0, len(items), batch_size):
        chunk = items[j:j + batch_size]
        enc = processor(text=[user_prompt(processor, q) for _, q in chunk], images=[im for im, _ in chunk],
                        padding=True, return_tensors="pt").to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, enc["input_ids"].shape[1]:]
        for row in new.tolist():
            row = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
            row = [t for t in row if t != tok.pad_token_id]
            ids_out.append(row)
            answers.append(tok.decode(row, skip_special_tokens=True).strip())
    return (answers, ids_out) if return_ids else answers


def simulate_rounds(matches: list[bool], k: int) -> tuple[int, int, int]:
    """(drafted, accepted, rounds) of greedy speculative decoding with draft length k."""
    t = drafted = accepted = rounds = 0
    while t < len(matches):
        a = 0
        while a < k and t + a < len(matches) and matches[t + a]:
            a += 1
        drafted += k
        accepted += a
        rounds += 1
        t += a + 1
    return drafted, accepted, rounds


@torch.inference_mode()
def draft_matches(drafter, processor, items: list[tuple], outputs: list[list[int]], with_image: bool,
                  batch_size: int = 64) -> list[list[bool]]:
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(tok.image_token)
    result = []
    for j in range(0, len(items), batch_size):
        chunk, outs = items[j:j + batch_size], outputs[j:j + batch_size]
        enc = processor(text=[user_prompt(processor, q) for _, q in chunk], images=[im for im, _ in chunk])
        seqs, starts = [], []
        for ids, y in zip(enc["input_ids"], outs):
            if not with_image:
                ids = [t for t in ids if t != image_id]
            starts.append(len(ids))
            seqs.append(ids + y)
        width = max(map(len, seqs))
        input_ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        kwargs = {"pixel_values": torch.from_numpy(np.stack(enc["pixel_values"]))} if with_image else {}
        pred = drafter(input_ids=input_ids, attention_mask=mask, **kwargs).logits.argmax(-1)
        for row, start, y in zip(pred.tolist(), starts, outs):
            result.append([row[start - 1 + i] == y[i] for i in range(len(y))])
    return result


@torch.inference_mode()
def decode_step_ms(model, vocab: int, batch: int, prompt_len: int = 80, steps: int = 30) -> float:
    """Mean wall time of one single-token decode forward (HF forward, KV cache) after a prompt."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    head = model.lm_head
    ids = torch.randint(10, vocab, (batch, prompt_len))
    out = lm(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    nxt = ids[:, -1:]
    for _ in range(3):
        o = lm(input_ids=nxt, past_key_values=cache, use_cache=True)
        head(o.last_hidden_state)
    t = time.perf_counter()
    for _ in range(steps):
        o = lm(input_ids=nxt, past_key_values=cache, use_cache=True)
        head(o.last_hidden_state)
    return (time.perf_counter() - t) / steps * 1000


def evaluate(model_dir: Path, per_task: int, k: int = 4) -> dict:
    torch.set_num_threads(2)
    processor = AutoProcessor.from_pretrained(model_dir / "target")
    fp32 = {"dtype": torch.float32}  # as the hf reference backend runs on CPU (the files are bf16)
    target = AutoModelForImageTextToText.from_pretrained(model_dir / "target", **fp32).eval()
    drafters = {
        "drafter-vlm": (AutoModelForImageTextToText.from_pretrained(model_dir / "drafter-vlm", **fp32).eval(), True),
        "drafter-text": (AutoModelForCausalLM.from_pretrained(model_dir / "drafter-text", **fp32).eval(), False),
    }
    assert AutoTokenizer.from_pretrained(model_dir / "drafter-text").get_vocab() == processor.tokenizer.get_vocab()
    report: dict = {"per_task": per_task, "k": k, "accuracy": {}, "acceptance": {}, "step_ms": {}}
    all_items, all_outputs = [], []
    t = time.time()
    for task in corpus.TASKS:
        samples = [corpus.sample(TEST_SEED, i, task=task) for i in range(per_task)]
        items = [(s.image, s.question) for s in samples]
        answers, ids = generate_answers(target, processor, items, return_ids=True)
        report["accuracy"][task] = sum(a == s.answer for a, s in zip(answers, samples)) / len(samples)
        wrong = [(s.question, s.answer, a) for a, s in zip(answers, samples) if a != s.answer]
        report.setdefault("examples_wrong", {})[task] = wrong[:3]
        all_items += items
        all_outputs += ids
    report["target_eval_s"] = time.time() - t
    for name, (drafter, with_image) in drafters.items():
        matches = draft_matches(drafter, processor, all_items, all_outputs, with_image)
        drafted = accepted = rounds = 0
        for m in matches:
            d, a, r = simulate_rounds(m, k)
            drafted, accepted, rounds = drafted + d, accepted + a, rounds + r
        tokens = sum(map(len, all_outputs))
        report["acceptance"][name] = {"rate": accepted / drafted, "tokens_per_target_forward": tokens / rounds}
    vocab = len(processor.tokenizer)
    models = {"target": target, **{n: m for n, (m, _) in drafters.items()}}
    for batch in (1, 16):
        ms = {n: decode_step_ms(m, vocab, batch) for n, m in models.items()}
        report["step_ms"][f"batch{batch}"] = {n: {"ms": v, "relative_to_target": v / ms["target"]} for n, v in ms.items()}
    report["params"] = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    report["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    return report


def model_card(report: dict, training: dict | None) -> str:
    p = report["params"]
    lines = [
        "# The specray model pair",
        "",
        "Trained from scratch on the synthetic corpus (`training/corpus.py`) by `python -m training.train "
        "configs/modelpair.yaml`; evaluated by `python -m training.evaluate models`. Standard transformers "
        "architectures: load with `AutoModelForImageTextToText` / `AutoModelForCausalLM` and `AutoProcessor`.",
        "",
        "| model | architecture | parameters |",
        "|---|---|---|",
        f"| `target/` | LLaVA: CLIP vision tower + Llama decoder | {p['target'] / 1e6:.2f}M |",
        f"| `drafter-vlm/` | LLaVA, same recipe | {p['drafter-vlm'] / 1e6:.2f}M ({p['target'] / p['drafter-vlm']:.0f}x fewer) |",
        f"| `drafter-text/` | Llama decoder, text only (no image) | {p['drafter-text'] / 1e6:.2f}M ({p['target'] / p['drafter-text']:.0f}x fewer) |",
        "",
        "All three share one byte-level BPE tokenizer trained on the corpus; `<image>` is a special token.",
        "The drafters are distilled from the target's own greedy answers.",
        "",
    ]
    if training:
        t = training["timings"]
        stages = [("vision pretraining + target (tower frozen)", "target_s"), ("end-to-end fine-tune", "finetune_s"),
                  ("distillation set", "distill_s"), ("VLM drafter", "drafter-vlm_s"), ("text drafter", "drafter-text_s")]
        total = sum(t.get(k, 0.0) for _, k in stages)
        lines += [
            "## Training",
            "",
            f"Command: `{training['command']}` (seeded; `--resume-target` goes on from a trained target). "
            f"Wall time on {report['machine']}, with other work sharing the two cores: {total / 60:.1f} min in all "
            "(" + ", ".join(f"{name} {t[k] / 60:.1f} min" for name, k in stages if k in t) + "). "
            f"Final training loss: target {training['target_losses'][-1]:.4f}"
            + (f", after fine-tune {training['finetune_losses'][-1]:.4f}" if training.get("finetune_losses") else "")
            + f", VLM drafter {training['drafter_losses']['drafter-vlm'][-1]:.4f}, text drafter "
            f"{training['drafter_losses']['drafter-text'][-1]:.4f}. Weights are stored in bf16.",
            "",
        ]
    lines += [
        f"## Evaluation (test split, {report['per_task']} rows per task)",
        "",
        "| task | target exact match |",
        "|---|---|",
        *[f"| {task} | {acc:.1%} |" for task, acc in report["accuracy"].items()],
        "",
        f"Greedy acceptance against the target at k={report['k']} (over the target's answers to every task above):",
        "",
        "| drafter | acceptance rate | tokens per target forward |",
        "|---|---|---|",
        *[f"| {n} | {a['rate']:.3f} | {a['tokens_per_target_forward']:.2f} |" for n, a in report["acceptance"].items()],
        "",
        "Cost of one decode step (HF forward with KV cache after an 80-token prompt), relative to the target:",
        "",
        "| model | batch 1 | batch 16 |",
        "|---|---|---|",
    ]
    for n in report["params"]:
        b1, b16 = report["step_ms"]["batch1"][n], report["step_ms"]["batch16"][n]
        lines.append(f"| {n} | {b1['ms']:.2f} ms ({b1['relative_to_target']:.2f}) | {b16['ms']:.2f} ms ({b16['relative_to_target']:.2f}) |")
    lines += ["", f"Machine: {report['machine']}. Raw figures: `eval.json`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Evaluate the model pair and write its model card.")
    ap.add_argument("model_dir")
    ap.add_argument("--per-task", type=int, default=100)
    args = ap.parse_args(argv)
    model_dir = Path(args.model_dir)
    report = evaluate(model_dir, args.per_task)
    print(json.dumps({k: report[k] for k in ("accuracy", "acceptance", "step_ms", "params")}, indent=1))
    (model_dir / "eval.json").write_text(json.dumps(report, indent=1))
    training_path = model_dir / "training.json"
    training = json.loads(training_path.read_text()) if training_path.exists() else None
    (model_dir / "README.md").write_text(model_card(report, training))


if __name__ == "__main__":
    main()
