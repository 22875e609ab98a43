"""Roofline arithmetic of one speculative round for a 7B Qwen2.5-VL target on an H100, with the shipped drafter's
size ratio scaled up: bytes and FLOPs per round, the k at which verification turns compute-bound, and the speedup
over plain decoding to expect from the measured acceptance. Arithmetic, not a measurement: `gpu_check` measures the
same table when a GPU is lent.

    python benchmarks/roofline.py [--context 1100] [--acceptance 0.824] [--gpu h100-sxm]
    python benchmarks/roofline.py --measure [--layers 4] [--device cuda]   # the same table, timed (gpu_check.sh)

Model shapes are the published configs' (Qwen2.5-VL-7B's language model; Qwen2.5-0.5B's for the drafter, 15x fewer
parameters, as the shipped VLM drafter is 12x smaller than its target), in bf16. A forward's time is the larger of
its FLOPs at the GPU's dense bf16 peak and its bytes (every weight once, plus every row's KV cache) at its memory
bandwidth; a round is k sequential drafter steps plus one target forward over B x (k+1) tokens. Launch overhead is
left out: that is what the captured step removes (about 1,150 kernels a forward eager, 6-12 ms of host time).
Acceptance: per draft, the chance it is accepted given the ones before were; the shipped VLM drafter's measured
acceptance rate at k=4 (models/README.md) is used as that chance, a simplification (acceptance falls with depth).

--measure times the engine's own decoder (engine/decoder.py) at these widths, with random weights and `--layers`
layers (scaled to the model's layer count; the head timed once), eager, over a cache of `--context` tokens a row:
each forward's milliseconds beside the arithmetic's, and the speedups they give.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GPUS = {  # dense bf16 FLOP/s, HBM bytes/s (NVIDIA's data sheets)
    "h100-sxm": (989e12, 3.35e12),
    "h100-pcie": (756e12, 2.0e12),
    "h200": (989e12, 4.8e12),
}


@dataclass(frozen=True)
class Decoder:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def linear_params(self) -> int:
        """The matmul weights a token goes through: attention, MLP, and the head."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (q_o + kv + mlp) + self.hidden * self.vocab

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * 2  # bf16 keys and values

    def forward(self, rows: int, tokens_per_row: int, context: int, peak: float, bandwidth: float) -> dict:
        tokens = rows * tokens_per_row
        flops = 2 * self.linear_params * tokens + 4 * self.layers * self.heads * self.head_dim * context * tokens
        weight_bytes = 2 * self.linear_params
        bytes_ = weight_bytes + rows * context * self.kv_bytes_per_token
        return {"flops": flops, "bytes": bytes_, "seconds": max(flops / peak, bytes_ / bandwidth),
                "compute_bound": flops / peak >= bytes_ / bandwidth}


TARGET = Decoder("Qwen2.5-VL-7B", 3584, 28, 28, 4, 128, 18944, 152064)
DRAFTER = Decoder("Qwen2.5-0.5B-sized", 896, 24, 14, 2, 64, 4864, 151936)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round yields: the accepted prefix plus the target's own, (1 - a^(k+1)) / (1 - a)."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def round_cost(rows: int, k: int, context: int, peak: float, bandwidth: float) -> dict:
    verify = TARGET.forward(rows, k + 1, context, peak, bandwidth)
    draft = DRAFTER.forward(rows, 1, context, peak, bandwidth)
    return {"verify": verify, "draft": draft,
            "seconds": verify["seconds"] + k * draft["seconds"],
            "flops": verify["flops"] + k * draft["flops"], "bytes": verify["bytes"] + k * draft["bytes"]}


def _decoder(spec: Decoder, layers: int, device: str):
    """The engine's LeanDecoder over a random-weight Qwen2 model of `spec`'s widths with `layers` layers."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engine.decoder import LeanDecoder

    config = Qwen2Config(hidden_size=spec.hidden, num_hidden_layers=layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                         intermediate_size=spec.intermediate, vocab_size=spec.vocab, tie_word_embeddings=False)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    return LeanDecoder(model.model, model.lm_head, config, device, torch.bfloat16)


def _forward_ms(dec, rows: int, tokens: int, context: int, device: str, reps: int = 10) -> tuple[float, float]:
    """Milliseconds of one forward of `rows` x `tokens` over `context` cached tokens a row: (layers, head)."""
    import torch

    cache = dec.new_cache()
    cache.allocate(rows, context + tokens)
    x = torch.randn(rows, tokens, dec.hidden_size, device=device, dtype=torch.bfloat16)
    starts = torch.full((rows,), context, device=device)
    timed = []
    for f in (lambda: dec.forward(cache, x, starts, length=context + tokens), lambda: dec.logits(x)):
        for _ in range(2):
            f()
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        if device == "cuda":
            torch.cuda.synchronize()
        timed.append(1e3 * (time.perf_counter() - t) / reps)
    return timed[0], timed[1]  # the layers (forward returns hidden states), and the head


def measure(args, peak: float, bandwidth: float) -> None:
    import torch

    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# measured on {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}: the engine's decoder, "
          f"{args.layers} layers scaled to the model's, eager, bf16, {args.context}-token context")
    print("| model | batch | tokens a row | measured ms | arithmetic ms |")
    print("|---|---|---|---|---|")
    ms: dict = {}
    for spec in (TARGET, DRAFTER):
        dec = _decoder(spec, args.layers, args.device)
        for rows in batches:
            for k in ((0, 1, 2, 4, 8) if spec is TARGET else (0,)):
                body, head = _forward_ms(dec, rows, k + 1, args.context, args.device)
                ms[spec.name, rows, k] = body * spec.layers / args.layers + head
                calc = 1e3 * spec.forward(rows, k + 1, args.context, peak, bandwidth)["seconds"]
                print(f"| {spec.name} | {rows} | {k + 1} | {ms[spec.name, rows, k]:.2f} | {calc:.2f} |")
        del dec
    print("| batch | best k (measured) | speedup over plain (measured times, acceptance model) |\n|---|---|---|")
    for rows in batches:
        gain = {k: expected_tokens(args.acceptance, k) * ms[TARGET.name, rows, 0]
                / (ms[TARGET.name, rows, k] + k * ms[DRAFTER.name, rows, 0]) for k in (0, 1, 2, 4, 8)}
        best = max(gain, key=gain.get)
        print(f"| {rows} | {best} | {gain[best]:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=1100, help="tokens in a row's cache: ~1,024 image + prompt")
    ap.add_argument("--acceptance", type=float, default=0.824)
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100-sxm")
    ap.add_argument("--measure", action="store_true", help="also time the engine's decoder at these widths")
    ap.add_argument("--layers", type=int, default=4, help="layers built for --measure")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,16,64,256", help="batch sizes --measure times")
    args = ap.parse_args()
    peak, bandwidth = GPUS[args.gpu]
    print(f"# roofline: {TARGET.name} target ({TARGET.linear_params / 1e9:.2f}B matmul params), "
          f"{DRAFTER.name} drafter ({DRAFTER.linear_params / 1e9:.2f}B), bf16, {args.gpu} "
          f"({peak / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s: compute-bound above {peak / bandwidth:.0f} "
          f"FLOP/byte), {args.context}-token context, acceptance {args.acceptance} per draft")
    print("| batch | plain step (ms) | plain tok/s | k turning verify compute-bound | best k | round at best k: "
          "GFLOP, GB, ms | tokens/round | speedup over plain |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in (1, 16, 64, 256):
        plain = round_cost(rows, 0, args.context, peak, bandwidth)
        turn = next((k for k in range(0, 65) if TARGET.forward(rows, k + 1, args.context, peak,
                                                               bandwidth)["compute_bound"]), None)
        best = max(range(0, 9), key=lambda k: expected_tokens(args.acceptance, k)
                   / round_cost(rows, k, args.context, peak, bandwidth)["seconds"])
        r = round_cost(rows, best, args.context, peak, bandwidth)
        tokens = expected_tokens(args.acceptance, best)
        speedup = tokens / r["seconds"] / (1 / plain["seconds"])
        print(f"| {rows} | {1e3 * plain['seconds']:.2f} | {rows / plain['seconds']:,.0f} | "
              f"{'never (k <= 64)' if turn is None else turn} | {best} | {r['flops'] / 1e9:,.0f}, "
              f"{r['bytes'] / 1e9:.1f}, {1e3 * r['seconds']:.2f} | {tokens:.2f} | {speedup:.2f}x |")
    if args.measure:
        measure(args, peak, bandwidth)


if __name__ == "__main__":
    main()
