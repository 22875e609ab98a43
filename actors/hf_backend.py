"""The `hf` backend: the target's own `model.generate`, batched with left padding.

It is the reference: the correctness oracle for the specray engine and the baseline of every benchmark.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from actors.request import Request, Result, SamplingParams, finish_text, stack_arrays


def pick_device(gpus: float) -> str:
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


class HFBackend:
    def __init__(self, model_path: str, device: str = "cpu", dtype: torch.dtype | None = None,
                 trust_remote_code: bool = False):
        self.device = device
        self.dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
        self.processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(
            model_path, dtype=self.dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
        ).to(device).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _batch_inputs(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        width = max(len(r.input_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.input_ids):] = torch.tensor(r.input_ids)
            mask[i, width - len(r.input_ids):] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        return inputs | stack_arrays([r.model_inputs for r in requests], self.dtype, self.device)

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
