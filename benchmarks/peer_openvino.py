"""OpenVINO GenAI's VLMPipeline as a peer for benchmarks/peers.py (`--openvino`): runs in its own venv (`make
openvino-venv`), never in the project's, and answers the driver over stdin/stdout, one JSON object a line, as
benchmarks/peer_vllm.py does.

    {"load": {"model": PATH, "dtype": "bfloat16", "threads": 2}}  -> {"startup_s": ..., "export_s": ...}
    {"run": {"rows": ROWS_JSON, "max_new_tokens": 64}}            -> {"wall_s": ..., "texts": [...], "tokens": [...]}
    {"quit": true}

The model folder is exported to OpenVINO IR once by optimum-intel (`optimum-cli export openvino --task
image-text-to-text`, float32 weights: the shipped bf16 weights exactly) into benchmarks/results/openvino/, reused
while the folder's weights are unchanged; the export is reported, not timed as start-up. Each row's prompt is the
model's own chat template applied by its processor (ROWS_JSON, as vLLM gets it), with its
<|vision_start|><|image_pad|><|vision_end|> where the template put it; VLMPipeline expands the image pad itself.
It generates one row at a time (VLMPipeline's `generate` takes one prompt). `tokens` counts each row's output
tokens without the EOS.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from peer_protocol import serve  # benchmarks/, this script's folder

ROOT = Path(__file__).resolve().parents[1]
PRECISION = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


def exported(model: str) -> tuple[Path, float]:
    """The model's OpenVINO IR folder (exported now if missing) and the seconds the export took (0: reused)."""
    digest = hashlib.sha256(Path(model, "model.safetensors").read_bytes()).hexdigest()[:12]
    out = ROOT / "benchmarks/results/openvino" / f"{Path(model).name}-{digest}"
    if (out / "openvino_language_model.xml").exists():
        return out, 0.0
    t = time.perf_counter()
    cli = Path(sys.executable).with_name("optimum-cli")
    subprocess.run([str(cli), "export", "openvino", "--model", model, "--task", "image-text-to-text",
                    "--weight-format", "fp32", str(out)], check=True, stdout=sys.stderr)
    return out, time.perf_counter() - t


def main() -> None:
    state: dict = {}

    def load(spec: dict) -> dict:
        path, export_s = exported(spec["model"])
        import openvino_genai as ov_genai

        t = time.perf_counter()
        state["pipe"] = ov_genai.VLMPipeline(str(path), "CPU", INFERENCE_NUM_THREADS=spec.get("threads", 2),
                                             INFERENCE_PRECISION_HINT=PRECISION[spec["dtype"]])
        config = state["config"] = ov_genai.GenerationConfig()
        config.do_sample = False
        config.apply_chat_template = False  # the prompt is the chat template's text already
        return {"startup_s": time.perf_counter() - t, "export_s": export_s}

    def run(spec: dict) -> dict:
        import numpy as np
        import openvino as ov
        from PIL import Image

        rows = json.loads(Path(spec["rows"]).read_text())
        pipe, config = state["pipe"], state["config"]
        config.max_new_tokens = spec["max_new_tokens"]
        texts, tokens = [], []
        t = time.perf_counter()
        for r in rows:
            image = ov.Tensor(np.asarray(Image.open(r["image"]).convert("RGB"))[None])
            result = pipe.generate(r["prompt"], images=[image], generation_config=config)
            texts.append(result.texts[0].strip())
            tokens.append(result.perf_metrics.get_num_generated_tokens())
        return {"wall_s": time.perf_counter() - t, "texts": texts, "tokens": tokens}

    serve(load, run)


if __name__ == "__main__":
    main()
