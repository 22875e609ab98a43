"""Roofline arithmetic of one speculative round for a 7B Qwen2.5-VL target on an H100, with the shipped drafter's
size ratio scaled up: bytes and FLOPs per round, the k at which verification turns compute-bound, and the speedup
over plain decoding to expect from the measured acceptance. Arithmetic, not a measurement: `gpu_check` measures the
same table when a GPU is lent.

    python benchmarks/roofline.py [--context 1100] [--acceptance 0.824] [--gpu h100-sxm]

Model shapes are the published configs' (Qwen2.5-VL-7B's language model; Qwen2.5-0.5B's for the drafter, 15x fewer
parameters, as the shipped VLM drafter is 12x smaller than its target), in bf16. A forward's time is the larger of
its FLOPs at the GPU's dense bf16 peak and its bytes (every weight once, plus every row's KV cache) at its memory
bandwidth; a round is k sequential drafter steps plus one target forward over B x (k+1) tokens. Launch overhead is
left out: that is what the captured step removes (about 1,150 kernels a forward eager, 6-12 ms of host time).
Acceptance: per draft, the chance it is accepted given the ones before were; the shipped VLM drafter's measured
acceptance rate at k=4 (models/README.md) is used as that chance, a simplification (acceptance falls with depth).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=1100, help="tokens in a row's cache: ~1,024 image + prompt")
    ap.add_argument("--acceptance", type=float, default=0.824)
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100-sxm")
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


if __name__ == "__main__":
    main()
