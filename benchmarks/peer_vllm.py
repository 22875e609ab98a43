"""vLLM's CPU build as a peer for benchmarks/peers.py: runs in the peer venv (`make peers-venv`), never in the
project's, and answers the driver over stdin/stdout, one JSON object a line.

    {"load": {"model": PATH, "dtype": "bfloat16", "threads": 2}}  -> {"startup_s": ...}
    {"run": {"rows": ROWS_JSON, "max_new_tokens": 64}}            -> {"wall_s": ..., "texts": [...], "tokens": [...]}
    {"quit": true}

ROWS_JSON lists {"prompt": the chat text with the image placeholder, "image": a PNG path}. The images are read
and the prompts processed inside the timed call (vLLM's processor runs in `generate`), as specray's preprocessing
is timed. `tokens` counts each row's output tokens without the EOS (vLLM's token ids end with it; HF's and
specray's counts leave it out). The prefix cache is off: a repeat over the same prompts must not reuse the earlier
pass's prompt KV and image embeddings, which no job gets.
"""
from __future__ import annotations

import json
import os
import time

from peer_protocol import serve  # benchmarks/, this script's folder


def main() -> None:
    state: dict = {}

    def load(spec: dict) -> dict:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        os.environ["OMP_NUM_THREADS"] = str(spec.get("threads", 2))
        t = time.perf_counter()
        from vllm import LLM

        llm = LLM(model=spec["model"], dtype=spec["dtype"], enable_prefix_caching=False,
                  limit_mm_per_prompt={"image": 1, "video": 0}, seed=0)
        from transformers import GenerationConfig

        ids = GenerationConfig.from_pretrained(spec["model"]).eos_token_id
        state["llm"] = llm
        state["eos"] = {llm.get_tokenizer().eos_token_id, *(ids if isinstance(ids, list) else [ids])} - {None}
        return {"startup_s": time.perf_counter() - t}

    def run(spec: dict) -> dict:
        from PIL import Image
        from vllm import SamplingParams

        with open(spec["rows"]) as f:
            rows = json.load(f)
        params = SamplingParams(temperature=0, max_tokens=spec["max_new_tokens"])
        t = time.perf_counter()
        prompts = [{"prompt": r["prompt"], "multi_modal_data": {"image": Image.open(r["image"]).convert("RGB")}}
                   for r in rows]
        results = state["llm"].generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        return {"wall_s": wall, "texts": [r.outputs[0].text.strip() for r in results],
                "tokens": [sum(t not in state["eos"] for t in r.outputs[0].token_ids) for r in results]}

    serve(load, run)


if __name__ == "__main__":
    main()
