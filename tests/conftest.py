"""Shared fixtures: one Ray instance for the whole session, a tiny model of the shipped architecture, shards."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TMPDIR", "/tmp/specray-test-ray")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded here: a hub id fails at once, not after retries

TINY = {
    "vision": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128},
}


@pytest.fixture(scope="session")
def ray_address():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight LLaVA (CLIP + Llama) with the shipped tokenizer recipe, saved like a real checkpoint."""
    import torch

    from training.modelpair import build_processor, build_vlm
    from training.tokenizer import train_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-model")
    tok = train_tokenizer(num_texts=300)
    build_vlm(TINY, tok).save_pretrained(path)
    build_processor(tok).save_pretrained(path)
    return path


def hf_forward_inputs(request, ids: list[int]) -> dict:
    """Keyword arguments for a HF VLM's forward over `ids` (the request's prompt and tokens after it): its image
    inputs as tensors (Qwen2.5-VL: the patches' grid too), and its per-token type ids, which M-RoPE reads,
    extended with text (0) over the tokens after the prompt."""
    import numpy as np
    import torch

    out = {"input_ids": torch.from_numpy(np.asarray(ids, np.int64))[None]}
    for key, value in request.model_inputs.items():
        value = torch.from_numpy(value)
        if key in ("mm_token_type_ids", "token_type_ids"):
            value = torch.nn.functional.pad(value, (0, len(ids) - value.shape[-1]))
        out[key] = value
    return out


def chi_square(tokens, p) -> tuple[float, float, int]:
    """Sampled tokens against the distribution p [vocab]: (statistic, p-value, outcomes tested apart). Outcomes
    expected fewer than 5 times are pooled into one."""
    import torch

    counts = torch.bincount(torch.as_tensor(tokens), minlength=len(p)).double()
    expected = p.double() * len(tokens)
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    stat = ((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum()
    p_value = torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2.0, dtype=torch.float64), stat / 2).item()
    return stat.item(), p_value, int(big.sum())


def corrupt_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()[:60]  # a truncated PNG


def run_cli(*args: str, address: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if address:
        env["RAY_ADDRESS"] = address
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def run_under_triton_interpreter(code: str) -> None:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1 (Triton kernels on CPU tensors); it must print ok."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
