"""The `hf` backend: the target's own `model.generate`, batched with left padding.

It is the reference: the correctness oracle for the specray engine and the baseline of every benchmark.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from engine.config import EngineConfig
from engine.device import resolve_device, resolve_dtype
from engine.model import eos_ids
from engine.request import Request, Result, SamplingParams, finish_text, stack_arrays


class HFBackend:
    def __init__(self, config: EngineConfig, device: str | None = None):
        self.config = config
        self.device = device or resolve_device(config.gpus)
        self.dtype = resolve_dtype(config.dtype, "hf", self.device)
        trust = config.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(config.target, trust_remote_code=trust)
        self.model = AutoModelForImageTextToText.from_pretrained(
            config.target, dtype=self.dtype, trust_remote_code=trust, use_safetensors=True,
        ).to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = eos_ids(self.model.generation_config, self.tokenizer)

    def _batch_inputs(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        width = max(len(r.input_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.input_ids):] = torch.tensor(r.input_ids)
            mask[i, width - len(r.input_ids):] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        return inputs | stack_arrays([r.model_inputs for r in requests], self.dtype, self.device, width, left=True)

    @torch.inference_mode()
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        """One model.generate call for requests whose image tensors share a shape."""
        inputs = self._batch_inputs(requests)
        sampling = params.temperature > 0
        kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=sampling, pad_token_id=self.pad_id,
                      eos_token_id=sorted(self.eos_ids))
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
            torch.manual_seed(params.seed)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        out = self.model.generate(**inputs, **kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1]:].tolist()
        return [self._result(row, params) for row in new_tokens]

    def _result(self, tokens: list[int], params: SamplingParams) -> Result:
        finish = "length"
        while tokens and tokens[-1] == self.pad_id and self.pad_id not in self.eos_ids:
            tokens = tokens[:-1]  # rows that stopped early are padded to the batch's length
        for i, t in enumerate(tokens):
            if t in self.eos_ids:
                tokens, finish = tokens[:i], "stop"
                break
        text, stopped = finish_text(self.tokenizer, tokens, params.stop)
        return Result(text=text, finish_reason="stop" if stopped else finish, num_output_tokens=len(tokens))
