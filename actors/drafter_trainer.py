"""The drafter trainer (model.drafter_training): a Ray actor that distils the drafter from the target's outputs
while the job runs, and the generate actors' side of it.

    generate actor ──add(examples)──► DrafterTrainer: buffer -> AdamW steps in a thread of its own
    generate actor ◄──latest(version)── every publish_every steps a new version: its weights in the object store

Nothing on the decoding side ever waits for the trainer: examples are sent without waiting for a reply, new
versions are asked for and fetched with zero-timeout waits, and a trainer that fails (or falls behind) leaves
each engine on the last version it loaded. Every version is also saved to `save_to` as it is published, so a
trainer that dies leaves its last version on disk; `finish` saves the final one and reports.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
import traceback

import fsspec
import ray
import torch

from engine.config import DrafterTraining
from engine.drafter_learning import DrafterLearner, Example, examples


def save_model_folder(learner: DrafterLearner, dest: str) -> None:
    """The learner's drafter as a model folder at `dest` (a local path or an fsspec URL), replaced whole."""
    fs, path = fsspec.core.url_to_fs(dest)
    with tempfile.TemporaryDirectory() as tmp:
        learner.save(tmp)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        for name in os.listdir(tmp):
            fs.put_file(os.path.join(tmp, name), f"{path.rstrip('/')}/{name}")


class DrafterTrainer:
    def __init__(self, spec: DrafterTraining, drafter: str, image_token_id: int | None,
                 trust_remote_code: bool = False):
        torch.set_num_threads(max(1, round(spec.cpus)))
        device = "cuda" if spec.gpus > 0 and torch.cuda.is_available() else "cpu"
        self.spec = spec
        self.learner = DrafterLearner(drafter, image_token_id, lr=spec.learning_rate, batch_size=spec.batch_size,
                                      buffer_rows=spec.buffer_rows, device=device, seed=spec.seed,
                                      trust_remote_code=trust_remote_code)
        self.lock = threading.Lock()
        self.version, self.ref = 0, None
        self.log: list[dict] = []  # per published version: version, t, steps, rows seen, mean loss since the last
        self.events: list[str] = []
        self.losses: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def add(self, batch: list[Example]) -> None:
        with self.lock:
            self.learner.add(batch)

    def latest(self, have: int):
        """[version, [weights' ObjectRef]] when a version newer than `have` is out, else None."""
        return None if self.version <= have or self.ref is None else [self.version, [self.ref]]

    def _loop(self) -> None:
        try:
            while not self.stop.is_set():
                with self.lock:
                    ready = self.learner.ready(self.spec.passes)
                if not ready:
                    time.sleep(0.05)
                    continue
                with self.lock:
                    batch = self.learner.draw()
                self.losses.append(self.learner.step(batch))
                if self.learner.steps % self.spec.publish_every == 0:
                    self._publish()
        except Exception as e:  # noqa: BLE001 - on record; the engines keep their last version
            self.events.append(f"trainer failed at step {self.learner.steps}: {type(e).__name__}: {e}")
            traceback.print_exc()

    def _publish(self) -> None:
        self.ref = ray.put(self.learner.state_dict())
        self.version += 1
        losses, self.losses = self.losses, []
        self.log.append({"version": self.version, "t": time.time(), "steps": self.learner.steps,
                         "rows_seen": self.learner.seen, "loss": sum(losses) / max(1, len(losses))})
        try:
            save_model_folder(self.learner, self.spec.save_to)
        except Exception as e:  # noqa: BLE001
            self.events.append(f"version {self.version} could not be saved to {self.spec.save_to}: {e}")

    def finish(self) -> dict:
        """Stop training, save the final drafter (if it learned anything) and report."""
        self.stop.set()
        self.thread.join(timeout=60)
        if self.learner.steps and (not self.log or self.log[-1]["steps"] != self.learner.steps):
            self._publish()
        return {"steps": self.learner.steps, "rows_seen": self.learner.seen, "versions": self.log,
                "events": self.events, "saved_to": self.spec.save_to if self.log else None}


class DrafterUpdates:
    """A generate actor's link to the trainer: sends its finished rows, and swaps in new versions between
    batches. Never blocks; a trainer that is gone is noted once and left alone."""

    def __init__(self, trainer, engine):
        self.trainer, self.engine = trainer, engine
        self.images = engine.drafter.ck.is_vlm
        self.eos = engine.drafter.ck.tokenizer.eos_token_id
        self.asked = None  # latest()'s ObjectRef in flight
        self.fetching = None  # (version, weights ObjectRef) being fetched
        self.lost: str | None = None

    def _gone(self, e: BaseException) -> None:
        if self.lost is None:
            self.lost = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            print(f"drafter trainer lost ({self.lost}); decoding goes on with drafter version "
                  f"{self.engine.drafter_version}", flush=True)

    def send(self, requests, results) -> None:
        if self.lost is not None:
            return
        batch = examples(requests, results, self.eos, self.images)
        if batch:
            try:
                self.trainer.add.remote(batch)
            except Exception as e:  # noqa: BLE001
                self._gone(e)

    def poll(self) -> None:
        """Swap in a newer version if one has arrived; ask for the next. Zero-timeout waits only."""
        if self.lost is not None:
            return
        try:
            if self.fetching is not None:
                version, ref = self.fetching
                if ray.wait([ref], timeout=0)[0]:
                    self.fetching = None
                    self.engine.update_drafter(ray.get(ref), version)
            elif self.asked is not None:
                if ray.wait([self.asked], timeout=0)[0]:
                    answer, self.asked = ray.get(self.asked), None
                    if answer is not None:
                        self.fetching = (answer[0], answer[1][0])
                        self.poll()
            if self.asked is None and self.fetching is None:
                self.asked = self.trainer.latest.remote(self.engine.drafter_version)
        except Exception as e:  # noqa: BLE001 - the trainer died, or its weights were lost with it
            self._gone(e)


def start_trainer(spec: DrafterTraining, drafter: str, image_token_id: int | None, trust_remote_code: bool,
                  name: str):
    return ray.remote(DrafterTrainer).options(
        name=name, num_cpus=spec.cpus, num_gpus=spec.gpus, max_concurrency=4, max_restarts=0,
    ).remote(spec, drafter, image_token_id, trust_remote_code)

