"""The target's accuracy and prefill speed under visual-token pruning, through the engine that prunes in a job.

For each ranking method the engine offers on the target's vision tower (engine/visual_tokens.py) and each keep
fraction, the held-out rows run through `SpecEngine` (float32, greedy, no drafter) with
`compression.visual_keep/visual_method`; per task, the share of exact answers; and the prefill time of every
row (vision tower, merger, pruning, decoder over the prompt; every setting timed in turn, three rounds, the
median) as a speed ratio against keep 1.0 in the same run. `tower-diversity` and `tower-spread` prune inside the
vision tower (engine/tower_pruning.py) before the block the target's recipe dropped tokens at. A method the
tower does not support is recorded with the engine's own reason.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from scenes import corpus
from training.heldout import heldout_requests

KEEPS = (1.0, 0.75, 0.5, 0.25)


@torch.inference_mode()
def prefill_seconds(engine, requests, batch: int, sync=lambda: None, passes: int = 2) -> float:
    """Seconds to prefill every row in batches of `batch` (tower, projector, pruning, decoder; the first token's
    logits), as the engine admits a full batch: the best of `passes` passes."""
    best = float("inf")
    model = engine.target
    for _ in range(passes):
        sync()
        t = time.perf_counter()
        for i in range(0, len(requests), batch):
            chunk = requests[i:i + batch]
            pe = model.embed_prompts([r.input_ids for r in chunk], [r.model_inputs for r in chunk])
            lengths = torch.tensor(pe.lengths, device=engine.device)
            cache = model.decoder.new_cache()
            cache.allocate(len(chunk), int(lengths.max()) + 1)
            model.decoder.logits(model.prefill(cache, pe, last=lengths - 1))
        sync()
        best = min(best, time.perf_counter() - t)
    return best


TOWER_METHODS = ("tower-diversity", "tower-spread")  # ranked inside the tower, before block `tower_layer`


def tower_layer_of(model_dir: Path) -> int:
    """The tower block before which the target learned to lose tokens (its recipe's token dropout), else 1."""
    import json

    record = model_dir / "training.json"
    train = json.loads(record.read_text())["config"]["train"] if record.exists() else {}
    for stage in ("attend", "target"):
        layer = ((train.get(stage) or {}).get("token_dropout") or {}).get("tower_layer")
        if layer is not None:
            return int(layer)
    return 1


def pruning_sweep(model_dir: Path, per_task: int, seed: int, batch: int = 32,
                  methods: tuple[str, ...] = ("attention", "diversity", *TOWER_METHODS), repeats: int = 3) -> dict:
    """Accuracy per task at each keep fraction and method; prefill time of each setting measured `repeats`
    times, interleaved with keep 1.0's (one pass each, in turn), as the median's ratio to keep 1.0's median."""
    import statistics

    from engine.config import Compression, EngineConfig
    from engine.engine import SpecEngine
    from engine.request import SamplingParams

    from engine.processor import load_processor

    processor = load_processor(str(model_dir / "target"))
    requests, answers, tasks = [], [], []
    for task in corpus.TASKS:
        requests += heldout_requests(processor, per_task, task=task, seed=seed)
        answers += [corpus.sample(seed, i, task).answer for i in range(per_task)]
        tasks += [task] * per_task
    params = SamplingParams(max_new_tokens=64)
    layer = tower_layer_of(model_dir)
    engines = {}

    def run(keep: float, method: str) -> dict:
        tower = method in TOWER_METHODS
        compression = Compression(visual_keep=keep, visual_method=method.removeprefix("tower-"),
                                  visual_tower_layer=layer if tower else None)
        config = EngineConfig(str(model_dir / "target"), None, dtype="float32", max_batch_size=batch,
                              parity_check=False, compression=compression)
        try:
            engine = SpecEngine(config, device="cpu")
        except ValueError as err:
            return {"unsupported": str(err)}
        engines[(method, keep)] = engine
        out = engine.generate(requests, params)
        right = [r.text.strip() == a for r, a in zip(out, answers)]
        return {"accuracy": {t: sum(ok for ok, tt in zip(right, tasks) if tt == t) / per_task for t in corpus.TASKS}}

    full = run(1.0, "diversity")
    sweep: dict = {"per_task": per_task, "seed": seed, "batch": batch, "repeats": repeats, "tower_layer": layer,
                   "keep_1.0": full, "methods": {}}
    for method in methods:
        rows = {}
        for keep in KEEPS[1:]:
            r = run(keep, method)
            if "unsupported" in r:
                rows = r
                break
            rows[str(keep)] = r
        sweep["methods"][method] = rows
    times: dict = {key: [] for key in engines}
    for _ in range(repeats):  # interleaved: this shared machine's speed drifts from minute to minute
        for key, engine in engines.items():
            times[key].append(prefill_seconds(engine, requests, batch, passes=1))
    full["prefill_s"] = statistics.median(times[("diversity", 1.0)])
    for method, rows in sweep["methods"].items():
        for keep, r in rows.items() if "unsupported" not in rows else ():
            r["prefill_s"] = statistics.median(times[(method, float(keep))])
            r["prefill_speedup"] = full["prefill_s"] / r["prefill_s"]
            r["points_lost"] = {t: 100 * (full["accuracy"][t] - r["accuracy"][t]) for t in corpus.TASKS}
    return sweep


def card_lines(sweep: dict) -> list[str]:
    """The model card's table: accuracy per task at each keep, points lost, prefill speed."""
    full = sweep["keep_1.0"]
    head = " | ".join(corpus.TASKS)
    lines = [f"| method | keep | {head} | prefill speed |", "|---|---|" + "---|" * (len(corpus.TASKS) + 1),
             "| (none) | 1.0 | " + " | ".join(f"{full['accuracy'][t]:.1%}" for t in corpus.TASKS) + " | 1.00x |"]
    for method, rows in sweep["methods"].items():
        if "unsupported" in rows:
            lines.append(f"| {method} | - | unsupported by this tower: {rows['unsupported']} |")
            continue
        name = method
        if method in TOWER_METHODS:
            name = f"{method.removeprefix('tower-')}, in the tower from block {sweep.get('tower_layer', 1)}"
        for keep, r in rows.items():
            cells = [f"{r['accuracy'][t]:.1%} ({-r['points_lost'][t]:+.1f})" for t in corpus.TASKS]
            lines.append(f"| {name} | {keep} | " + " | ".join(cells) + f" | {r['prefill_speedup']:.2f}x |")
    return lines
