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
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from engine.processor import load_processor

from scenes import corpus
from training.heldout import FRESH_SEED, TEST_SEED
from training.modelpair import user_prompt

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


def tokens_line(training: dict | None) -> str:
    """The card's sentence on the pair's tokenizer and prompt format."""
    if training and training["config"].get("arch") == "qwen2_5_vl":
        return ("All three share one byte-level BPE tokenizer trained on the corpus, with Qwen2.5-VL's own special "
                "tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, `<|vision_start|><|image_pad|><|vision_end|>`, "
                "`<|video_pad|>`, ...) and its chat template (the default system prompt; a user turn's question is "
                "laid out before its image, so every image token sees what is asked). An engine that runs a "
                "Qwen2.5-VL fine-tune runs the pair as it is.")
    return "All three share one byte-level BPE tokenizer trained on the corpus; `<image>` is a special token."


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
        kwargs = {}
        if with_image:
            kwargs["pixel_values"] = torch.from_numpy(np.stack(enc["pixel_values"]))
            if "image_grid_thw" in enc:  # Qwen2.5-VL: the grids, and which tokens are image tokens (its M-RoPE)
                kwargs["image_grid_thw"] = torch.tensor(np.asarray(enc["image_grid_thw"]))
                kwargs["mm_token_type_ids"] = (input_ids == image_id).long()
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


def evaluate(model_dir: Path, per_task: int, k: int = 4, prune_per_task: int = 50) -> dict:
    torch.set_num_threads(2)
    processor = load_processor(str(model_dir / "target"))
    fp32 = {"dtype": torch.float32}  # as the hf reference backend runs on CPU (the files are bf16)
    target = AutoModelForImageTextToText.from_pretrained(model_dir / "target", **fp32).eval()
    drafters = {
        "drafter-vlm": (AutoModelForImageTextToText.from_pretrained(model_dir / "drafter-vlm", **fp32).eval(), True),
        "drafter-text": (AutoModelForCausalLM.from_pretrained(model_dir / "drafter-text", **fp32).eval(), False),
    }
    assert AutoTokenizer.from_pretrained(model_dir / "drafter-text").get_vocab() == processor.tokenizer.get_vocab()
    report: dict = {"per_task": per_task, "k": k, "acceptance": {}, "step_ms": {}}
    all_items, all_outputs = [], []
    t = time.time()
    for key, seed in (("accuracy", TEST_SEED), ("accuracy_fresh", FRESH_SEED)):
        report[key] = {}
        for task in corpus.TASKS:
            samples = [corpus.sample(seed, i, task=task) for i in range(per_task)]
            items = [(s.image, s.question) for s in samples]
            answers, ids = generate_answers(target, processor, items, return_ids=True)
            report[key][task] = sum(a == s.answer for a, s in zip(answers, samples)) / len(samples)
            if seed == TEST_SEED:
                wrong = [(s.question, s.answer, a) for a, s in zip(answers, samples) if a != s.answer]
                report.setdefault("examples_wrong", {})[task] = wrong[:3]
                if task in ("vqa", "position"):  # the same rows accuracy_by_kind asks about
                    tally_by_kind(samples, answers, report.setdefault("accuracy_by_kind", {}))
                    tally_binding(samples, answers, report.setdefault("binding", {}))
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
    report["architecture"] = target.config.model_type
    if prune_per_task:
        from training.evaluate_pruning import pruning_sweep
        report["pruning"] = pruning_sweep(model_dir, prune_per_task, TEST_SEED)
    report["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    return report


ARCHITECTURES = {  # model_type -> (VLM, its decoder alone)
    "llava": ("LLaVA: CLIP vision tower + Llama decoder", "Llama decoder"),
    "qwen2_5_vl": ("Qwen2.5-VL: its vision tower with the 2x2 patch merger + Qwen2 decoder with M-RoPE",
                   "Qwen2 decoder"),
}


HAND = "<!-- written by hand below this line: python -m training.evaluate keeps it -->"


def resumed_from(training: dict) -> list[str]:
    """The commands of the runs a resumed pair went on from, oldest first (one string in older records)."""
    earlier = training.get("resumed_from", [])
    return [earlier] if isinstance(earlier, str) else earlier


def model_card(report: dict, training: dict | None) -> str:
    p = report["params"]
    vlm, text = ARCHITECTURES.get(report.get("architecture", "llava"), (report.get("architecture"), "decoder"))
    config = (training or {}).get("command", "python -m training.train configs/modelpair.yaml").split()[3]
    lines = [
        "# The specray model pair",
        "",
        f"Trained from scratch on the synthetic corpus (`scenes/corpus.py`) by `python -m training.train "
        f"{config}`; evaluated by `python -m training.evaluate models`. Standard transformers "
        "architectures: load with `AutoModelForImageTextToText` / `AutoModelForCausalLM` and `AutoProcessor` (`engine.processor.load_processor` without torchvision).",
        "",
        "| model | architecture | parameters |",
        "|---|---|---|",
        f"| `target/` | {vlm} | {p['target'] / 1e6:.2f}M |",
        f"| `drafter-vlm/` | the same architecture, smaller | {p['drafter-vlm'] / 1e6:.2f}M ({p['target'] / p['drafter-vlm']:.0f}x fewer) |",
        f"| `drafter-text/` | {text}, text only (no image) | {p['drafter-text'] / 1e6:.2f}M ({p['target'] / p['drafter-text']:.0f}x fewer) |",
        "",
        tokens_line(training),
        "The drafters are distilled from the target's own greedy answers.",
        "",
    ]
    if training:
        t = training["timings"]
        stages = [("vision pretraining + target (tower frozen)", "target_s"), ("end-to-end fine-tune", "finetune_s"),
                  ("the earlier runs' attention-supervised fine-tune", "attend_earlier_s"),
                  ("attention-supervised fine-tune", "attend_s"),
                  ("distillation set", "distill_s"), ("VLM drafter", "drafter-vlm_s"), ("text drafter", "drafter-text_s")]
        total = sum(t.get(k, 0.0) for _, k in stages)
        lines += [
            "## Training",
            "",
            ("Commands: " + ", then ".join(f"`{c}`" for c in resumed_from(training) + [training["command"]])
             + ", each going on from the one before's target (the stages a run skipped keep the earlier run's "
             "times). Seeded. "
             if training.get("resumed_from") else
             f"Command: `{training['command']}` (seeded; `--resume-target` goes on from a trained target). ")
            + f"Wall time on {report['machine']}"
            + (f", in {training['precision']}" if training.get("precision") else "")
            + " (training stages, the evaluation after them not counted"
            + (f"; the earlier runs' in {training['earlier_precision']}" if training.get("earlier_precision") else "")
            + "): "
            f"{total / 60:.1f} min in all "
            "(" + ", ".join(f"{name} {t[k] / 60:.1f} min" for name, k in stages if k in t) + "). "
            f"Final training loss: target {training['target_losses'][-1]:.4f}"
            + (f", after fine-tune {training['finetune_losses'][-1]:.4f}" if training.get("finetune_losses") else "")
            + (f", after the attention-supervised one {training['attend_losses'][-1]:.4f} (with "
               f"{training['config']['train']['attend']['weight']} x the attention loss)"
               if training.get("attend_losses") else "")
            + f", VLM drafter {training['drafter_losses']['drafter-vlm'][-1]:.4f}, text drafter "
            f"{training['drafter_losses']['drafter-text'][-1]:.4f}. Weights are stored in bf16.",
            "",
        ]
    lines += [
        f"## Evaluation ({report['per_task']} rows per task, greedy, HF generate in float32)",
        "",
        f"| task | target exact match: test split | fresh seed ({FRESH_SEED}) |",
        "|---|---|---|",
        *[f"| {task} | {acc:.1%} | {report.get('accuracy_fresh', {}).get(task, float('nan')):.1%} |"
          for task, acc in report["accuracy"].items()],
        "",
        *by_kind_lines(report.get("accuracy_by_kind")),
        *(["Lookup questions (colour, shape, position), by whose attribute the answer gives:", "",
           *binding_lines(report["binding"]), ""] if report.get("binding") else []),
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
    if "pruning" in report:
        from training.evaluate_pruning import card_lines
        sw = report["pruning"]
        lines += ["", f"Visual-token pruning through the engine (float32, greedy; test split, {sw['per_task']} rows per "
                  f"task, prefill of every row in batches of {sw['batch']}: tower, merger, pruning, decoder), exact "
                  "match and points against keep 1.0:", "", *card_lines(sw)]
    lines += ["", f"Machine: {report['machine']}. Raw figures: `eval.json`.", ""]
    return "\n".join(lines)


def by_kind_lines(by_kind: dict | None) -> list[str]:
    """The model card's table of accuracy per kind of question (none for a report without it)."""
    if not by_kind:
        return []
    return ["Per kind of question (test split; `python -m training.evaluate models --by-kind N`):", "",
            "| question | right |", "|---|---|",
            *[f"| {kind} ({corpus.PROMPTS[kind]}) | {r} / {n} ({r / n:.0%}) |" for kind, (r, n) in by_kind.items()],
            ""]


def question_kind(question: str) -> str:
    """Which of the corpus's question templates a question comes from (caption, ocr, count, color, shape, exists,
    position)."""
    for kind, template in corpus.PROMPTS.items():
        head = template.split("{")[0]
        if question == template or ("{" in template and question.startswith(head)):
            return kind
    raise ValueError(f"not a corpus question: {question!r}")


def tally_by_kind(samples: list, answers: list[str], out: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Adds each answer to `out`'s {kind: (right, asked)}."""
    for a, s in zip(answers, samples):
        kind = question_kind(s.question)
        right, asked = out.get(kind, (0, 0))
        out[kind] = (right + (a == s.answer), asked + 1)
    return out


LOOKUPS = ("color", "shape", "position")  # the questions that name one shape and ask for another of its attributes


def answer_about(kind: str, asked: corpus.Shape, shape: corpus.Shape) -> str:
    """The answer to a `kind` question about `asked` if the model read its attribute off `shape` instead."""
    if kind == "color":
        return f"The {asked.kind} is {shape.color}."
    if kind == "shape":
        return f"The {asked.color} object is a {shape.kind}."
    return f"The {asked.name} is at the {corpus.POSITIONS[shape.cell]}."


def tally_binding(samples: list, answers: list[str], out: dict[int, dict[str, int]]) -> dict[int, dict[str, int]]:
    """Adds each lookup question (colour, shape, position) to `out`'s {shapes in the scene: {"asked": n,
    "another": n, "neither": n}}: whether the answer gives the attribute of the shape the question names, of
    another shape in the same scene, or of none. A model that perceives every shape but cannot find the one a
    question names answers "another" as often as chance allows: (shapes - 1) / shapes."""
    for a, s in zip(answers, samples):
        kind = question_kind(s.question)
        if kind not in LOOKUPS:
            continue
        (asked,) = [sh for sh in s.scene.shapes if answer_about(kind, sh, sh) == s.answer]
        others = {answer_about(kind, asked, sh) for sh in s.scene.shapes if sh is not asked} - {s.answer}
        row = out.setdefault(len(s.scene.shapes), {"asked": 0, "another": 0, "neither": 0})
        row["asked" if a == s.answer else "another" if a in others else "neither"] += 1
    return out


def binding_lines(binding: dict[int, dict[str, int]]) -> list[str]:
    """The table of tally_binding, one row per number of shapes in the scene."""
    lines = ["| shapes in the scene | answer about the asked shape | about another shape | neither |",
             "|---|---|---|---|"]
    for n in sorted(binding):
        row = binding[n]
        total = sum(row.values())
        lines.append(f"| {n} | " + " | ".join(f"{row[k]} / {total} ({row[k] / total:.0%})"
                                              for k in ("asked", "another", "neither")) + " |")
    return lines


def accuracy_by_kind(target_dir: Path, n: int, seed: int = TEST_SEED) -> tuple[dict, dict]:
    """({kind: (right, asked)}, tally_binding) of the target's greedy answers to the first n vqa and n position
    questions of a split: where a model that reads captions right fails to look a shape up by the question."""
    processor = load_processor(str(target_dir))
    model = AutoModelForImageTextToText.from_pretrained(target_dir, dtype=torch.float32).eval()
    samples = [corpus.sample(seed, i, task=t) for t in ("vqa", "position") for i in range(n)]
    answers = generate_answers(model, processor, [(s.image, s.question) for s in samples])
    return tally_by_kind(samples, answers, {}), tally_binding(samples, answers, {})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Evaluate the model pair and write its model card.")
    ap.add_argument("model_dir")
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--prune-per-task", type=int, default=50, help="rows per task of the pruning sweep (0: skip it)")
    ap.add_argument("--by-kind", type=int, default=0, metavar="N",
                    help="only: the target's accuracy per kind of question over N vqa and N position rows")
    ap.add_argument("--card-only", action="store_true", help="only rewrite README.md from eval.json and training.json")
    ap.add_argument("--pruning-only", action="store_true",
                    help="only re-run the pruning sweep into eval.json (the rest of it kept) and rewrite README.md")
    args = ap.parse_args(argv)
    model_dir = Path(args.model_dir)
    if args.by_kind:
        torch.set_num_threads(2)
        by_kind, binding = accuracy_by_kind(model_dir / "target", args.by_kind)
        for kind, (right, asked) in by_kind.items():
            print(f"{kind:9s} {right:4d} / {asked:4d}  {right / asked:.1%}")
        print("\nLookup questions (colour, shape, position): whose attribute the answer gives")
        print("\n".join(binding_lines(binding)))
        return
    if args.card_only or args.pruning_only:
        report = json.loads((model_dir / "eval.json").read_text())
        if args.pruning_only:
            from training.evaluate_pruning import pruning_sweep

            torch.set_num_threads(2)
            report["pruning"] = pruning_sweep(model_dir, args.prune_per_task, TEST_SEED)
            (model_dir / "eval.json").write_text(json.dumps(report, indent=1))
    else:
        report = evaluate(model_dir, args.per_task, prune_per_task=args.prune_per_task)
        print(json.dumps({k: report.get(k) for k in ("accuracy", "accuracy_fresh", "acceptance", "step_ms", "params")},
                         indent=1))
        (model_dir / "eval.json").write_text(json.dumps(report, indent=1))
    training_path = model_dir / "training.json"
    training = json.loads(training_path.read_text()) if training_path.exists() else None
    card = model_dir / "README.md"
    hand = card.read_text().partition(HAND)[2] if card.exists() else ""  # notes written by hand stay
    card.write_text(model_card(report, training) + (f"\n{HAND}{hand}" if hand else ""))


if __name__ == "__main__":
    main()
