"""Attention supervision (training/attention_supervision.py): the asked shape is found from the question and the
scene, its cell maps to the image tokens the shipped processor puts there, and the loss moves a supervised head's
attention onto those tokens."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from scenes import corpus
from training.attention_supervision import AttentionSupervision, asked_cells, attention_loss, cell_tokens
from training.modelpair import build_qwen_processor, build_qwen_vlm
from training.tokenizer import train_tokenizer
from training.train import Batcher, ground_truth_batches, train_model

ROOT = Path(__file__).resolve().parents[2]
SCENE = corpus.Scene(shapes=(corpus.Shape("circle", "red", "small", 0), corpus.Shape("diamond", "blue", "large", 5)),
                     word=None, background=(10, 20, 30), jitter=((0, 0), (1, -2)))


@pytest.mark.parametrize("question, cells", [
    ("What color is the diamond?", [5]), ("What shape is the red object?", [0]), ("Where is the blue diamond?", [5]),
    ("Is there a red circle?", [0]), ("What color is the square?", []), ("How many shapes are there?", []),
    ("Describe the image.", []),
    # an exists question about a shape that is not there: the empty cells (the answer is no: nothing matches)
    ("Is there a red diamond?", [1, 2, 3, 4, 6, 7, 8]), ("Is there a green square?", [1, 2, 3, 4, 6, 7, 8])])
def test_the_cells_to_look_at_are_the_named_shapes_or_for_an_absent_one_the_empty_cells(question, cells):
    assert asked_cells(question, SCENE) == cells


def test_an_absent_shape_in_a_scene_with_text_looks_at_the_empty_cells_off_the_text_row():
    scene = corpus.Scene(shapes=(corpus.Shape("circle", "red", "small", 0),), word="cat", background=(0, 0, 0),
                         jitter=((0, 0),))
    assert asked_cells("Is there a red square?", scene) == [1, 2, 6, 7, 8]


def test_a_cell_is_the_square_of_tokens_over_it_or_nothing_when_cells_split_tokens():
    assert cell_tokens([5], 6) == [16, 17, 22, 23]
    assert cell_tokens([0, 8], 3) == [0, 8]
    assert cell_tokens([4], 4) == [] and cell_tokens([], 6) == []


@pytest.mark.parametrize("cell", [0, 4, 8])
def test_the_cells_tokens_are_where_the_shipped_processor_puts_the_shape(cell):
    """The merged tokens with a patch that is not plain background are exactly the cell's tokens, in the token
    order of the shipped pair's own processor (8-pixel patches merged 2x2: a 6x6 grid). (A shape at its largest
    jitter can reach one pixel into the next cell, so supervision marks the cell, not every pixel.)"""
    from engine.processor import load_processor

    processor = load_processor(str(ROOT / "models/target"))
    scene = corpus.Scene((corpus.Shape("square", "yellow", "large", cell),), None, (0, 0, 0), ((0, 0),))
    enc = processor.image_processor(images=[corpus.render(scene)])
    patches = np.asarray(enc["pixel_values"])  # [144, 3 * 2 * 8 * 8], 4 consecutive rows per merged token
    background = np.median(patches, axis=0)  # most patches are plain black
    shape = np.abs(patches - background).max(-1) > 1e-4
    tokens = {int(i) // 4 for i in np.nonzero(shape)[0]}
    assert tokens == set(cell_tokens([cell], 6)), (tokens, cell_tokens([cell], 6))  # a large square spans its cell


def test_the_loss_moves_a_supervised_heads_attention_onto_the_asked_tokens():
    """The same tiny model trained the same steps with and without supervision: only the supervised one's head
    puts clearly more of its attention on the asked tokens."""
    tok = train_tokenizer(num_texts=300)
    processor = build_qwen_processor(tok)
    spec = {"vision": {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
            "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": 128}}
    attend = AttentionSupervision({"weight": 4.0, "heads": [[1, 2]]})

    def batches():  # every row asks about image tokens 5 and 10 (of the tiny processor's 16)
        for b in ground_truth_batches(Batcher(processor), 4, task_mix={"vqa": 1.0}):
            b["asked"] = torch.tensor([[5, 10]] * 4)
            yield b

    probe = next(batches())

    def measured(model) -> float:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(**{k: v for k, v in probe.items() if k != "asked"}, output_attentions=True)
        model.set_attn_implementation("sdpa")
        return float(attention_loss(out.attentions, probe, model.config.image_token_id, attend.heads))

    losses = {}
    for supervised in (False, True):
        torch.manual_seed(0)
        model = build_qwen_vlm(spec, tok)
        before = measured(model)
        train_model(model, batches(), steps=30, lr=3e-3, warmup=2, name="attend", log_every=30,
                    attend=attend if supervised else None)
        assert model.config._attn_implementation == "sdpa"  # the fast path again once trained
        losses[supervised] = measured(model)
    assert losses[True] < 0.7 * before and losses[True] < losses[False] - 0.5, (before, losses)
    with pytest.raises(ValueError, match="attend.heads"):
        AttentionSupervision({"weight": 0.1, "heads": [[2, 0]]}).check(model)


def test_the_recipe_refuses_a_head_its_target_lacks_before_training(capsys):
    from training.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["configs/modelpair_qwen.yaml", "--set", "train.attend.heads=[[8, 0]]", "--output-dir", "/nonexistent"])
    assert exit_.value.code == 2
    assert "train.attend.heads: (8, 0) is not a head of a 8-layer decoder" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("train.attend.task_mix", "{exist: 1.0}"),
                                          ("train.target.task_mix", "{caption: 0.5, vqa: 0.3, positon: 0.2}")])
def test_the_recipe_refuses_a_task_no_mix_can_draw_before_training(capsys, field, value):
    """A typo in a task mix would silently become vqa rows an hour in: it is a config error, said first."""
    from training.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["configs/modelpair_qwen.yaml", "--set", f"{field}={value}", "--output-dir", "/nonexistent"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert field in err and "unknown task" in err, err


@pytest.mark.parametrize("stage,setting", [
    ("train.attend", "train.attend.token_dropout={p: 0.5, methods: [tower-sprad]}"),
    ("train.attend.then", "train.attend.then={steps: 9, token_dropout: {methods: [tower-sprad]}}")])
def test_the_recipe_refuses_a_token_dropout_method_before_training(capsys, stage, setting):
    """A misspelt ranking in the attend stage or its second pass would fail half an hour in: it is said first."""
    from training.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["configs/modelpair_qwen.yaml", "--set", setting, "--output-dir", "/nonexistent"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{stage}.token_dropout.methods: unknown 'tower-sprad'" in err, err


def test_the_recipe_goes_on_from_a_trained_target_through_the_attend_stage(tmp_path, monkeypatch):
    """--resume-target with finetune.steps=0: the shipped target's fine-tune record carries over, the attend stage
    trains, then its second pass (attend.then) with its own token dropout, and the new pair is written (tiny step
    counts: seconds)."""
    import json
    import shlex

    import training.train as recipe
    from training.evaluate import model_card, resumed_from
    from training.train import main

    stages = []

    def recorded(model, batches, steps, lr, warmup, name, **kw):
        dropout = kw.get("dropout")
        stages.append((name, steps, lr, dropout and (dropout.p, dropout.keep, dropout.methods, dropout.tower_layer)))
        return train_model(model, batches, steps, lr, warmup, name, **kw)

    monkeypatch.setattr(recipe, "train_model", recorded)
    then = "{steps: 3, token_dropout: {p: 0.7, keep: [0.5], methods: [tower-spread], tower_layer: 0}}"
    tiny = ["train.finetune.steps=0", "train.attend.steps=2", f"train.attend.then={then}", "train.vision.steps=2",
            "train.drafter.steps=2", "train.drafter.batch_size=8", "train.distill.num_samples=16",
            "train.distill.batch_size=8"]
    main(["configs/modelpair_qwen.yaml", "--resume-target", "models/target", "--output-dir", str(tmp_path),
          "--skip-eval"] + [a for o in tiny for a in ("--set", o)])
    lr = yaml.safe_load(Path("configs/modelpair_qwen.yaml").read_text())["train"]["attend"]["lr"]
    attend = [s for s in stages if s[0].startswith("attend")]
    assert [s[:3] for s in attend] == [("attend", 2, lr), ("attend-then", 3, lr)], stages
    assert attend[1][3] == (0.7, [0.5], ["tower-spread"], 0) and attend[0][3] != attend[1][3]
    record, before = (json.loads(p.read_text()) for p in (tmp_path / "training.json", Path("models/training.json")))
    assert record["finetune_losses"] == before["finetune_losses"]
    assert record["timings"].get("finetune_s") == before["timings"].get("finetune_s")  # none when it had none
    # the shipped target had supervised steps already: they and their time stay on the record, with the new ones
    assert record["attend_losses"][:-2] == before["attend_losses"] and len(record["attend_losses"]) > 2
    times = record["timings"]
    assert times["attend_earlier_s"] == sum(before["timings"].get(k, 0) for k in ("attend_s", "attend_earlier_s"))
    assert record["resumed_from"] == resumed_from(before) + [before["command"]] and "attend_s" in times
    assert f"train.attend.then={then}" in shlex.split(record["command"])  # the command pastes into a shell
    card = model_card(json.loads(Path("models/eval.json").read_text()), record)  # names every run of the chain
    assert all(f"`{c}`" in card for c in record["resumed_from"] + [record["command"]]), card
    assert all((tmp_path / name / "model.safetensors").exists() for name in ("target", "drafter-vlm", "drafter-text"))


def test_the_recipe_can_go_on_from_a_trained_target_with_no_attend_steps(tmp_path):
    """--resume-target with attend.steps 0 (only the drafters again, e.g. with more steps): no attend stage runs
    (it once divided by its zero steps), the target's supervised steps and their time stay on the record."""
    import json

    from training.evaluate import model_card
    from training.train import main

    tiny = ["train.finetune.steps=0", "train.attend.steps=0", "train.vision.steps=2", "train.drafter.steps=2",
            "train.drafter.batch_size=8", "train.distill.num_samples=16", "train.distill.batch_size=8",
            "train.precision=float32"]
    main(["configs/modelpair_qwen.yaml", "--resume-target", "models/target", "--output-dir", str(tmp_path),
          "--skip-eval"] + [a for o in tiny for a in ("--set", o)])
    record, before = (json.loads(p.read_text()) for p in (tmp_path / "training.json", Path("models/training.json")))
    # this run's precision, and the earlier runs' where they differ (a bf16 run gone on from in float32)
    earlier = (before.get("earlier_precision") or "").split(" then ") + [before["precision"]]
    earlier = list(dict.fromkeys(p for p in earlier if p))  # each precision once, first seen first
    assert record["precision"] == "float32"
    assert record.get("earlier_precision", "float32") == " then ".join(earlier)
    card = model_card(json.loads(Path("models/eval.json").read_text()), record)
    assert "in float32 (training stages" in card
    assert "earlier_precision" not in record or f"the earlier runs' in {record['earlier_precision']})" in card
    assert record["attend_losses"] == before["attend_losses"] and "attend_s" not in record["timings"]
    assert record["timings"]["attend_earlier_s"] == sum(before["timings"].get(k, 0)
                                                       for k in ("attend_s", "attend_earlier_s"))
    assert len(record["drafter_losses"]["drafter-vlm"]) >= 1
