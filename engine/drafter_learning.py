"""Online distillation: a drafter that learns from the target's own outputs while the job runs.

    a host's engine                                   a learner (hosted by actors/drafter_trainer.py)
    finished rows ──examples()──► Example ──add()──► buffer (the latest rows) ──step()──► AdamW on the drafter
    drafter.load_weights(state) ◄─────────────────── state_dict(), published every few steps as a new version

What the drafter learns to predict is what it will be asked to draft: the target's output tokens (its EOS last
where the row stopped on it) after the prompt as the drafter sees it (a text-only drafter without image tokens,
token ids past its vocabulary as its stand-in, a VLM drafter with the row's image tensors). With `topk`, the
target's top-k logits at each output position are the soft labels (Online Speculative Decoding's distillation
on the target's distribution, where keeping it is cheap: k values per token, taken from the verify forward).

The drafter only proposes; the target verifies every token. Whatever the drafter learns, the output is the
target's: learning changes speed, never text.
"""
from __future__ import annotations

import random
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from engine.request import Request, Result, stack_arrays


@dataclass
class Example:
    input_ids: list[int]  # the target's prompt tokens (image placeholders included)
    model_inputs: dict[str, np.ndarray] | None  # the row's image tensors (None for a text-only drafter)
    output_ids: list[int]  # the target's output tokens, its EOS last where the row stopped on it
    topk: tuple[np.ndarray, np.ndarray] | None = None  # the target's top-k (logits, ids) per output token


def examples(requests: list[Request], results: list[Result], eos_id: int | None, images: bool) -> list[Example]:
    """The training examples of a batch's finished rows (error rows and empty answers give none). `images`:
    keep the image tensors (the drafter is a VLM)."""
    out = []
    for r, res in zip(requests, results):
        if res is None or res.error is not None or not res.token_ids:
            continue
        ids = list(res.token_ids) + ([eos_id] if res.finish_reason == "stop" and eos_id is not None else [])
        topk = None
        if res.topk is not None:
            values, index = res.topk
            n = min(len(ids), len(values))
            ids, topk = ids[:n], (values[:n], index[:n])
        out.append(Example(list(r.input_ids), r.model_inputs if images else None, ids, topk))
    return out


class DrafterLearner:
    """A drafter's Hugging Face model in training: a buffer of the latest examples, AdamW steps on batches drawn
    from it, and its weights as the engine's LoadedModel.load_weights takes them."""

    def __init__(self, path: str, image_token_id: int | None, lr: float = 3e-4, batch_size: int = 16,
                 buffer_rows: int = 4096, device: str = "cpu", seed: int = 0, trust_remote_code: bool = False):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.is_vlm = hasattr(config, "vision_config")
        auto = AutoModelForImageTextToText if self.is_vlm else AutoModelForCausalLM
        self.model = auto.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                          use_safetensors=True).to(device).train()
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.path, self.device, self.batch_size = path, device, batch_size
        self.image_token_id = image_token_id  # the target's: dropped from a text-only drafter's prompt
        self.size = max(tok.get_vocab().values()) + 1  # ids past the drafter's vocabulary become its stand-in
        self.stand_in = next((t for t in (tok.unk_token_id, tok.pad_token_id) if t is not None), 0)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
        self.buffer: deque[Example] = deque(maxlen=buffer_rows)
        self.rng = random.Random(seed)
        self.steps = 0
        self.seen = 0

    def add(self, batch: list[Example]) -> None:
        self.buffer.extend(batch)
        self.seen += len(batch)

    def ready(self, passes: float | None = None) -> bool:
        """A batch can be drawn; with `passes`, only while the steps taken have used each row seen fewer than
        `passes` times on average."""
        if len(self.buffer) < self.batch_size:
            return False
        return passes is None or self.steps * self.batch_size < passes * self.seen

    def _ids(self, ids: list[int]) -> list[int]:
        return [t if t < self.size else self.stand_in for t in ids]

    def tensors(self, batch: list[Example]) -> tuple[dict, torch.Tensor, tuple | None]:
        """(the model's inputs, labels [n, width] with -100 off the answers, soft labels or None) of a batch,
        right-padded."""
        seqs, labels = [], []
        for ex in batch:
            prompt = ex.input_ids if self.is_vlm else [t for t in ex.input_ids if t != self.image_token_id]
            prompt, answer = self._ids(prompt), self._ids(ex.output_ids)
            seqs.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(map(len, seqs))
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        lab = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, (s, la) in enumerate(zip(seqs, labels)):
            ids[i, :len(s)], mask[i, :len(s)], lab[i, :len(la)] = torch.tensor(s), 1, torch.tensor(la)
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self.is_vlm:
            inputs |= stack_arrays([ex.model_inputs for ex in batch], torch.float32, self.device, width)
            if "image_grid_thw" in inputs and "mm_token_type_ids" not in inputs:  # Qwen-VL's rope index needs it
                inputs["mm_token_type_ids"] = (ids == self.image_token_id).long().to(self.device)
        soft = None
        if all(ex.topk is not None for ex in batch):
            k = batch[0].topk[0].shape[-1]
            values = torch.full((len(batch), width, k), float("-inf"))
            index = torch.zeros((len(batch), width, k), dtype=torch.long)
            for i, (ex, la) in enumerate(zip(batch, labels)):
                start = len(la) - len(ex.output_ids)
                values[i, start:len(la)] = torch.from_numpy(np.asarray(ex.topk[0], dtype=np.float32))
                index[i, start:len(la)] = torch.from_numpy(np.asarray(ex.topk[1], dtype=np.int64))
            soft = (values.to(self.device), index.clamp(max=self.size - 1).to(self.device))
        return inputs, lab.to(self.device), soft

    def loss(self, batch: list[Example]) -> torch.Tensor:
        """Next-token cross-entropy on the answers: against the target's tokens, or its top-k distribution."""
        inputs, labels, soft = self.tensors(batch)
        logits = self.model(**inputs).logits[:, :-1].float()  # position t predicts token t + 1
        labels = labels[:, 1:]
        mask = labels != -100
        logp = logits.log_softmax(-1)
        if soft is None:
            return -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][mask].mean()
        values, index = soft[0][:, 1:], soft[1][:, 1:]
        p = values.softmax(-1).nan_to_num(0.0)  # rows of -inf (off the answers) give nan: masked below
        return -(p * logp.gather(-1, index)).sum(-1)[mask].mean()

    def draw(self) -> list[Example]:
        """A batch drawn at random from the buffer."""
        return self.rng.sample(list(self.buffer), min(self.batch_size, len(self.buffer)))

    def step(self, batch: list[Example] | None = None) -> float:
        """One AdamW step on `batch` (default: one drawn from the buffer); returns its loss."""
        batch = self.draw() if batch is None else batch
        loss = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return loss.item()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current weights, on the CPU, detached from training (safe to publish while it goes on)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def save(self, out: str | Path) -> None:
        """The drafter as a model folder `model.drafter` loads: safetensors and config, and the original's
        tokenizer and processor files."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        source = Path(self.path)
        if source.is_dir():  # the tokenizer's and processor's files: whatever save_pretrained did not write
            for f in source.iterdir():
                weights = f.name.endswith((".safetensors", ".safetensors.index.json"))
                if f.is_file() and not weights and not (out / f.name).exists():
                    shutil.copy2(f, out / f.name)
        else:  # a hub id: its tokenizer (and processor, for a VLM) from the cache
            AutoTokenizer.from_pretrained(self.path).save_pretrained(out)
