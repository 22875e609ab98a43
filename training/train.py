"""Train the shipped model pair in one seeded command:

    python -m training.train configs/modelpair.yaml [--set train.target.steps=100 ...] [--output-dir models]

1. train the byte-level BPE tokenizer on the corpus;
2. pretrain the target's vision tower on dense scene labels (training.vision_pretrain), freeze it, and
   train the projector and decoder on ground-truth answers (train split), as LLaVA does (with
   train.target.shallow_layers, a shallower decoder first, then grown to full depth: training.grow); then
   fine-tune everything, tower included, at a low learning rate on fresh samples (train.finetune, optional),
   with attention supervision (train.attend: chosen heads learn to look at the shape a question asks about, on
   prompts with every image token and, with its token_dropout, on pruned ones; train.attend.then: a second
   pass with its own steps and token dropout);
3. generate the target's own greedy answers on fresh train prompts (the distillation set);
4. train the VLM drafter (its tower pretrained the same way) and the text-only drafter on those answers (sequence-level distillation);
5. evaluate on the test split and write the model card (training.evaluate).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shlex
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from scenes import corpus
from training.adapt import carried, retokenized
from training.attention_supervision import AttentionSupervision, asked_cells, asked_tensor, cell_tokens
from training.modelpair import (
    build_processor,
    build_qwen_processor,
    build_qwen_text_lm,
    build_qwen_vlm,
    build_text_lm,
    build_vlm,
    user_prompt,
)
from training.evaluate import resumed_from
from training.grow import grow
from training.length_groups import length_grouped
from training.optim import autocast, fit, uses_bf16
from training.token_dropout import TokenDropout
from training.tokenizer import answer_text, train_tokenizer
from training.vision_pretrain import pretrain_vision

TRAIN_SEED = corpus.SPLIT_SEEDS["train"]
DISTILL_OFFSET = 10_000_000  # distillation prompts come from a later stretch of the train stream
ATTEND_OFFSET = 20_000_000  # so do the attention-supervised fine-tune's rows


def load_config(path: str, overrides: list[str]) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = yaml.safe_load(value)
    return cfg


class Batcher:
    """Turns (image, question, answer) triples into padded training tensors; labels only on the answer."""

    def __init__(self, processor, with_image: bool = True):
        self.processor = processor
        self.tok = processor.tokenizer
        self.with_image = with_image
        self.image_id = self.tok.convert_tokens_to_ids(self.tok.image_token)

    def __call__(self, items: list[tuple]) -> dict:
        """items: (image, question, answer), or (image, question, answer, asked tokens) for attention
        supervision (training/attention_supervision.py), which then come as `asked`."""
        prompts = [user_prompt(self.processor, item[1]) for item in items]
        enc = self.processor(text=prompts, images=[item[0] for item in items])
        seqs, labels = [], []
        for ids, (_, _, answer, *_) in zip(enc["input_ids"], items):
            ans = self.tok(answer_text(self.tok, answer), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            if not self.with_image:
                ids = [t for t in ids if t != self.image_id]
            seqs.append(ids + ans)
            labels.append([-100] * len(ids) + ans)
        width = max(map(len, seqs))
        pad = self.tok.pad_token_id
        out = {
            "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
        }
        if self.with_image:
            out["pixel_values"] = torch.from_numpy(np.stack(enc["pixel_values"]))
            if "image_grid_thw" in enc:  # Qwen2.5-VL: patches of every image in one tensor, their grids, token types
                out["image_grid_thw"] = torch.tensor(np.asarray(enc["image_grid_thw"]))
                out["mm_token_type_ids"] = (out["input_ids"] == self.image_id).long()
        if items and len(items[0]) > 3:
            out["asked"] = asked_tensor([item[3] for item in items])
        return out


def train_model(model, batches, steps: int, lr: float, warmup: int, name: str, log_every: int = 50,
                device: str = "cpu", dropout: TokenDropout | None = None,
                attend: AttentionSupervision | None = None, bf16: bool | None = None,
                by_length: bool = True) -> list[float]:
    """AdamW + warmup/cosine schedule, in bf16 autocast where `bf16` (None: on a GPU; training.optim.uses_bf16);
    with `dropout`, some batches see only part of each image's tokens; with `attend`, every batch adds the
    attention loss (a dropout batch's on the tokens it kept). `by_length`: the decoder runs on groups of rows of
    like length, so padding costs no work (the same loss and gradient; training/length_groups.py). Returns the
    loss per logged window."""
    attention = model.config._attn_implementation
    if attend:
        attend.check(model)
        model.set_attn_implementation("eager")  # the only one that returns attention weights
    plain = attend.loss if attend else (lambda m, batch: m(**batch).loss)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    def loss_fn() -> torch.Tensor:
        batch = {k: v.to(device) for k, v in next(batches).items()}
        with autocast(device, bf16):
            return dropout.loss(model, batch, plain, attend) if dropout else plain(model, batch)

    with length_grouped(model) if by_length else contextlib.nullcontext():
        losses = fit(model.parameters(), loss_fn, opt, sched, steps, name, log_every)
    model.eval()
    if attend:
        model.set_attn_implementation(attention)
    return losses


def save_bf16(model, path: Path) -> None:
    """Ship bf16 weights (half the bytes); the model in memory becomes the shipped one, rounded."""
    model.cpu().to(torch.bfloat16).save_pretrained(path)
    model.float()


def ground_truth_batches(batcher: Batcher, batch_size: int, start: int = 0, task_mix: dict | None = None,
                         curriculum: list[dict] | None = None, asked_side: int | None = None):
    """Batches of the train stream; `task_mix` ({task: weight}) draws each sample's task, else the corpus's mix.
    `curriculum`: stages that come first, each {steps, task_mix, max_shapes} (e.g. questions about one- and
    two-shape scenes, where finding the shape a question names is easy to learn, before captions); then
    `task_mix` on the whole stream. `asked_side` (image tokens per side): each item carries the image tokens of
    the shape its question asks about, for attention supervision."""
    i = start
    rng = random.Random(start)
    stages = [(c["steps"], c.get("task_mix") or task_mix, c.get("max_shapes", 3)) for c in curriculum or []]
    stages.append((None, task_mix, 3))
    for steps, mix, max_shapes in stages:
        tasks, weights = zip(*mix.items()) if mix else (None, None)
        done = 0
        while steps is None or done < steps:
            items = []
            for _ in range(batch_size):
                s = corpus.sample(TRAIN_SEED, i, rng.choices(tasks, weights)[0] if tasks else None, max_shapes)
                items.append((s.image, s.question, s.answer) if asked_side is None else
                             (s.image, s.question, s.answer, cell_tokens(asked_cells(s.question, s.scene), asked_side)))
                i += 1
            done += 1
            yield batcher(items)


def distillation_set(model, processor, num: int, batch_size: int) -> list[tuple]:
    """The target's own greedy answers on fresh training prompts: what the drafters learn to predict."""
    from training.evaluate import generate_answers

    samples = [corpus.sample(TRAIN_SEED, DISTILL_OFFSET + i) for i in range(num)]
    answers = generate_answers(model, processor, [(s.image, s.question) for s in samples], batch_size=batch_size)
    return [(s.image, s.question, a) for s, a in zip(samples, answers)]


def cycle_batches(batcher: Batcher, items: list[tuple], batch_size: int, seed: int):
    if len(items) < batch_size:
        raise ValueError(f"train.distill.num_samples: {len(items)} is fewer than one drafter batch ({batch_size})")
    rng = random.Random(seed)
    order = list(range(len(items)))
    while True:
        rng.shuffle(order)
        for j in range(0, len(order) - batch_size + 1, batch_size):
            yield batcher([items[k] for k in order[j:j + batch_size]])


def architecture(cfg: dict, tok):
    """(processor, build_vlm(spec), build_text_lm(spec)) of the config's `arch`: llava (CLIP + Llama, the
    default) or qwen2_5_vl (Qwen2.5-VL's tower and merger + a Qwen2 decoder with multimodal RoPE)."""
    if cfg.get("arch", "llava") == "qwen2_5_vl":
        patch = cfg["patch_size"]
        return (build_qwen_processor(tok, cfg["image_size"], patch), lambda spec: build_qwen_vlm(spec, tok, patch_size=patch),
                lambda spec: build_qwen_text_lm(spec, tok))
    kw = {"image_size": cfg["image_size"], "patch_size": cfg["patch_size"]}
    return (build_processor(tok, cfg["image_size"], cfg["patch_size"]), lambda spec: build_vlm(spec, tok, **kw),
            lambda spec: build_text_lm(spec, tok))


def new_tokenizer(cfg: dict):
    """The recipe's tokenizer: Qwen2.5-VL's tokens and chat template for its architecture, else LLaVA-style."""
    style = "qwen" if cfg.get("arch") == "qwen2_5_vl" else "llava"
    return train_tokenizer(vocab_size=cfg["vocab_size"], question_first=cfg.get("question_first", False), style=style)


def shallow_spec(spec: dict, layers: int | None) -> dict:
    """The target's spec with a `layers`-deep decoder: the stage that learns the lookup before growing."""
    return spec if not layers else {**spec, "text": {**spec["text"], "num_hidden_layers": layers}}


def image_side(cfg: dict) -> int:
    """Image tokens per side of the pair's square images (Qwen2.5-VL: patches merged 2x2)."""
    merge = 2 if cfg.get("arch") == "qwen2_5_vl" else 1
    return cfg["image_size"] // (cfg["patch_size"] * merge)


def target_steps(tc: dict) -> int:
    """Batches of the train stream the target's first stages use (the fine-tune starts after them)."""
    return tc["steps"] + (tc["grown"]["steps"] if tc.get("shallow_layers") else 0)


def vision_tower(model):
    """The tower the recipe pretrains: CLIP's, or Qwen2.5-VL's (with its merger, which maps into the decoder)."""
    return getattr(model.model, "vision_tower", None) or model.model.visual


def freeze_tower(model, frozen: bool) -> None:
    """As LLaVA: the pretrained tower stays frozen while the projector (Qwen2.5-VL: the merger) and the decoder
    learn; the fine-tune unfreezes it."""
    vision_tower(model).requires_grad_(not frozen)
    merger = getattr(vision_tower(model), "merger", None)
    if merger is not None:
        merger.requires_grad_(True)


def task_mixes(train: dict) -> list[tuple[str, dict]]:
    """Every task mix of the recipe, with the config field it sits in."""
    tc = train["target"]
    mixes = [("train.target.task_mix", tc.get("task_mix"))]
    mixes += [(f"train.target.curriculum[{i}].task_mix", c.get("task_mix"))
              for i, c in enumerate(tc.get("curriculum") or [])]
    mixes.append(("train.attend.task_mix", (train.get("attend") or {}).get("task_mix")))
    return [(field, mix) for field, mix in mixes if mix]


def attend_passes(ac: dict, seed: int) -> list[tuple[str, dict, int]]:
    """The attend stage's passes over its rows: (name, settings, dropout seed). With `then`, a second pass on the
    rows after, its own steps and token dropout (e.g. concentrated on the keep and ranking a job prunes at), the
    rest as the attend stage's."""
    passes = [("attend", ac, seed + 2)]
    if ac.get("then"):
        passes.append(("attend-then", {**ac, **ac["then"]}, seed + 3))
    return passes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for a bigger pair on a GPU")
    ap.add_argument("--resume-target", default=None,
                    help="a trained target folder: skip its first stages and go on from it (train.finetune "
                         "and train.attend run on it where their steps are not 0)")
    ap.add_argument("--adapt-from", default=None,
                    help="a trained target folder whose tokenizer differs from the recipe's: its weights over the "
                         "recipe's tokenizer (training/adapt.py), then as --resume-target")
    ap.add_argument("--drafters-from", default=None,
                    help="a trained pair's folder: the drafters start from its drafter-vlm and drafter-text (mapped "
                         "to the recipe's tokenizer where theirs differs) instead of from scratch")
    args = ap.parse_args(argv)
    if args.resume_target and args.adapt_from:
        ap.error("--resume-target and --adapt-from: give one")
    cfg = load_config(args.config, args.overrides)
    attend = AttentionSupervision(cfg["train"].get("attend"))  # off when absent or weight 0
    if attend:  # a head the target lacks is said now, not after an hour of training
        try:
            text = cfg["target"]["text"]
            attend.check_shape(text["num_hidden_layers"], text["num_attention_heads"])
        except ValueError as e:
            ap.error(f"train.{e}")
    known = corpus.TASKS + corpus.VQA_KINDS
    for field, mix in task_mixes(cfg["train"]):  # so is a task no mix can draw (a typo would become vqa rows)
        if unknown := sorted(set(mix) - set(known)):
            ap.error(f"{field}: unknown task {unknown[0]!r} (tasks: {', '.join(known)})")
    stages = [("train.target", cfg["train"]["target"])]
    stages += [(f"train.{name.replace('-', '.')}", pc)
               for name, pc, _ in attend_passes(cfg["train"].get("attend") or {}, 0)]
    for field, stage in stages:  # and a token-dropout method no ranking has
        try:
            TokenDropout(stage.get("token_dropout"), 0)
        except ValueError as e:
            ap.error(f"{field}.{e}")
    try:
        bf16 = uses_bf16(cfg["train"].get("precision", "auto"), args.device)
    except ValueError as e:
        ap.error(f"train.{e}")
    print(f"[train] precision: {'bf16 autocast' if bf16 else 'float32'}", flush=True)
    out = Path(args.output_dir or cfg["output_dir"])
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["train"]["threads"])
    t_start = time.time()
    timings = {}

    tc, vc = cfg["train"]["target"], cfg["train"]["vision"]
    ft = cfg["train"].get("finetune") or {"steps": 0}
    resumed = args.resume_target or args.adapt_from
    if resumed:
        from transformers import AutoModelForImageTextToText

        from engine.processor import load_processor

        processor = load_processor(resumed)
        target = AutoModelForImageTextToText.from_pretrained(resumed).float()  # its config stays as saved
        if args.adapt_from:  # the same weights over the recipe's own tokenizer (training/adapt.py)
            old_vocab = processor.tokenizer.get_vocab()
            tok = new_tokenizer(cfg)
            processor, vlm, _ = architecture(cfg, tok)
            old, target = target, vlm(cfg["target"])
            print(f"[adapt] embedding rows {retokenized(old, target, old_vocab, tok.get_vocab())}", flush=True)
        tok = processor.tokenizer
        before = json.loads((Path(resumed).parent / "training.json").read_text())
        timings["target_s"] = before["timings"]["target_s"]
        target_losses, vision_losses = before["target_losses"], {"target": before.get("vision_losses", {}).get("target")}
    else:
        tok = new_tokenizer(cfg)
        processor, vlm, _ = architecture(cfg, tok)
        target = vlm(shallow_spec(cfg["target"], tc.get("shallow_layers")))
        t = time.time()
        vision_losses = {"target": pretrain_vision(vision_tower(target), processor.image_processor, vc["steps"],
                                                   vc["batch_size"], vc["lr"], cfg["seed"], device=args.device,
                                                   cell_head=vc.get("cell_head", False), bf16=bf16)}
        freeze_tower(target, True)
        stream = ground_truth_batches(Batcher(processor), tc["batch_size"], task_mix=tc.get("task_mix"),
                                      curriculum=tc.get("curriculum"))
        dropout = TokenDropout(tc.get("token_dropout"), cfg["seed"])
        target_losses = train_model(target, stream, tc["steps"], tc["lr"], tc["warmup"], "target",
                                    device=args.device, dropout=dropout, bf16=bf16)
        if tc.get("shallow_layers"):  # grow to the target's depth, same function, and go on with every layer
            target = grow(target.cpu(), vlm(cfg["target"]))
            freeze_tower(target, True)
            gc = tc["grown"]
            target_losses += train_model(target, stream, gc["steps"], gc["lr"], gc["warmup"], "grown",
                                         device=args.device, dropout=dropout, bf16=bf16)
        timings["target_s"] = time.time() - t
    t = time.time()
    freeze_tower(target, False)
    finetune_losses = []
    if ft["steps"]:
        finetune_losses = train_model(target, ground_truth_batches(Batcher(processor), tc["batch_size"],
                                                                   start=target_steps(tc) * tc["batch_size"],
                                                                   task_mix=tc.get("task_mix")),
                                      ft["steps"], ft["lr"], ft["warmup"], "finetune", device=args.device,
                                      dropout=TokenDropout(tc.get("token_dropout"), cfg["seed"] + 1), bf16=bf16)
        timings["finetune_s"] = time.time() - t
    elif resumed and "finetune_s" in before["timings"]:  # its own fine-tune stands: the record too
        timings["finetune_s"], finetune_losses = before["timings"]["finetune_s"], before["finetune_losses"]
    attend_losses = []
    if attend and cfg["train"]["attend"]["steps"]:  # own token dropout: the lookup learned on pruned prompts too
        ac, t = cfg["train"]["attend"], time.time()
        rows = ground_truth_batches(Batcher(processor), ac["batch_size"], start=ATTEND_OFFSET,
                                    task_mix=ac.get("task_mix") or tc.get("task_mix"),
                                    asked_side=image_side(cfg))
        for name, pc, seed in attend_passes(ac, cfg["seed"]):
            attend_losses += train_model(target, rows, pc["steps"], pc["lr"], pc["warmup"], name, device=args.device,
                                         attend=attend, dropout=TokenDropout(pc.get("token_dropout"), seed), bf16=bf16)
        timings["attend_s"] = time.time() - t
    if resumed and before.get("attend_losses"):  # the resumed target had supervised steps already
        earlier = before["timings"]  # a run that only retrained the drafters has earlier runs' time and no own
        timings["attend_earlier_s"] = earlier.get("attend_s", 0.0) + earlier.get("attend_earlier_s", 0.0)
        attend_losses = before["attend_losses"] + attend_losses
    save_bf16(target, out / "target")
    processor.save_pretrained(out / "target")

    dc = cfg["train"]["distill"]
    t = time.time()
    with autocast(args.device, bf16):  # the answers of the target as it is served in bf16
        distill = distillation_set(target.to(args.device), processor, dc["num_samples"], dc["batch_size"])
    target.cpu()
    timings["distill_s"] = time.time() - t
    print(f"[distill] {len(distill)} target answers in {timings['distill_s']:.0f}s", flush=True)

    fc = cfg["train"]["drafter"]
    drafter_losses = {}
    _, vlm, text_lm = architecture(cfg, tok)
    for name, builder, with_image in (("drafter-vlm", lambda: vlm(cfg["drafter_vlm"]), True),
                                      ("drafter-text", lambda: text_lm(cfg["drafter_text"]), False)):
        torch.manual_seed(cfg["seed"])
        model = builder()
        t = time.time()
        if args.drafters_from:  # trained already (its tower too): its weights over this tokenizer, then on
            print(f"[{name}] from {args.drafters_from}: embedding rows "
                  f"{carried(model, Path(args.drafters_from) / name, tok)}", flush=True)
        elif with_image:
            vision_losses[name] = pretrain_vision(vision_tower(model), processor.image_processor, vc["steps"],
                                                  vc["batch_size"], vc["lr"], cfg["seed"], device=args.device,
                                                  cell_head=vc.get("cell_head", False), bf16=bf16)
            freeze_tower(model, True)
        drafter_losses[name] = train_model(model, cycle_batches(Batcher(processor, with_image), distill,
                                                                fc["batch_size"], cfg["seed"]),
                                           fc["steps"], fc["lr"], fc["warmup"], name, device=args.device,
                                           bf16=bf16)
        timings[f"{name}_s"] = time.time() - t
        save_bf16(model, out / name)
        (processor if with_image else tok).save_pretrained(out / name)

    timings["total_s"] = time.time() - t_start
    command = "python -m training.train " + " ".join([args.config] + [f"--set {shlex.quote(o)}"  # as a shell takes it
                                                                       for o in args.overrides])
    record = {"config": cfg, "precision": "bf16 autocast" if bf16 else "float32", "timings": timings,
              "target_losses": target_losses, "finetune_losses": finetune_losses,
              "attend_losses": attend_losses,
              "drafter_losses": drafter_losses,
              "vision_losses": vision_losses,
              "command": command + (f" --resume-target {args.resume_target}" if args.resume_target else "")
              + (f" --adapt-from {args.adapt_from}" if args.adapt_from else "")
              + (f" --drafters-from {args.drafters_from}" if args.drafters_from else "")}
    if resumed:  # the runs whose stages it went on from (oldest first), whose times those stages carry
        record["resumed_from"] = resumed_from(before) + [before["command"]]
        chain = before.get("earlier_precision", "").split(" then ") + [before.get("precision", "")]
        earlier = list(dict.fromkeys(p for p in chain if p))  # each precision once, first seen first
        if earlier and earlier != [record["precision"]]:  # e.g. going on from a bf16 run on a CPU without bf16
            record["earlier_precision"] = " then ".join(earlier)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    print(f"[train] done in {timings['total_s']:.0f}s", flush=True)
    if not args.skip_eval:
        from training.evaluate import main as evaluate
        evaluate([str(out)])


if __name__ == "__main__":
    main()
