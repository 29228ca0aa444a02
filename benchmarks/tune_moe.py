"""Tune the fused MoE kernels' launch configurations for this GPU: for each MoE shape (experts,
intermediate size per rank, hidden size, top-k) and token count, time every candidate configuration
and keep the fastest in chitu/ops/triton/moe_configs/<GPU name>.json, which fused_experts reads.

    python benchmarks/tune_moe.py [--out DIR] [--shapes Qwen3-30B-A3B ...] [--tp 1 2 4 8] [--tokens 1 2 ...]
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import triton

from chitu.ops.torch_ref import moe as ref_moe
from chitu.ops.triton import fused_moe
from chitu.ops.triton.moe_config import CONFIG_DIR, BlockConfig, GemvConfig, MoEConfig, default_config, shape_key
from chitu.ops.triton.tuned_table import gpu_file, update_table

# (experts, intermediate, hidden, top-k) of the full models; tensor parallelism slices the intermediate size
MODELS = {"Qwen3-30B-A3B": (128, 768, 2048, 8), "Qwen3-235B-A22B": (128, 1536, 4096, 8),
          "Mixtral-8x7B": (8, 14336, 4096, 2), "GLM-4.5-Air": (128, 1408, 4096, 8),
          "DeepSeek-V3": (256, 2048, 7168, 8)}
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
TILES = [(32, 128), (32, 256), (64, 64), (64, 128), (64, 256), (128, 64), (128, 128)]  # (block_n, block_k)
CANDIDATES = [BlockConfig(m, n, k, 1 if m == 16 else 8, w, s)
              for m, (n, k), (w, s) in itertools.product([16, 32, 64, 128], TILES, [(4, 3), (4, 4), (8, 3)])
              if not (m >= 64 and k == 256)]
GEMV_TOKENS = 16  # the few-token GEMV path is a candidate up to this many tokens
GEMV_CANDIDATES = [GemvConfig(up, down, k, w) for (up, down), k, w in itertools.product(
    [(8, 8), (16, 16), (32, 32), (8, 16), (16, 8), (16, 32), (32, 16)], [128, 256, 512], [4, 8])]


def time_config(inputs, config: MoEConfig) -> float:
    """Milliseconds of GPU time, replayed from a CUDA graph as decode runs it (no launch overhead)."""
    try:
        fused_moe.fused_experts(*inputs, config=config)  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fused_moe.fused_experts(*inputs, config=config)
        return triton.testing.do_bench(graph.replay, warmup=2, rep=6, return_mode="median")
    except triton.runtime.errors.OutOfResources:
        return float("inf")


def candidates_for(tokens: int, slots_per_expert: float) -> list[MoEConfig]:
    """Row blocks far larger than an expert's share of the slots only pad, and the smallest ones starve
    the tensor cores once every expert has many rows: skip them."""
    largest = max(16, 2 * triton.next_power_of_2(int(slots_per_expert)))
    smallest = 32 if slots_per_expert >= 64 else 16
    blocks = [c for c in CANDIDATES if smallest <= c.block_m <= largest]
    return (GEMV_CANDIDATES if tokens <= GEMV_TOKENS else []) + blocks


def tune_shape(experts: int, inter: int, hidden: int, top_k: int, token_counts: list[int]) -> dict[str, dict]:
    gate_up = torch.randn(experts, 2 * inter, hidden, dtype=torch.bfloat16, device="cuda") / hidden**0.5
    down = torch.randn(experts, hidden, inter, dtype=torch.bfloat16, device="cuda") / inter**0.5
    best = {}
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
        weights, ids = ref_moe.select_experts(torch.randn(tokens, experts, device="cuda"), top_k, "softmax", True,
                                              None, 1, 1, 1.0)
        inputs = (x, gate_up, down, weights, ids, 0)
        timed = {c: time_config(inputs, c) for c in candidates_for(tokens, tokens * top_k / experts)}
        winner = min(timed, key=timed.get)
        baseline = time_config(inputs, default_config(tokens * top_k, tokens))
        print(f"  T={tokens:5d}: {timed[winner] * 1e3:8.1f} us with {winner} (heuristic {baseline * 1e3:.1f} us)",
              flush=True)
        best[str(tokens)] = winner.__dict__
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CONFIG_DIR)
    parser.add_argument("--shapes", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help="the token counts to tune")
    args = parser.parse_args()
    path = gpu_file(args.out, torch.cuda.current_device())
    for name in args.shapes:
        experts, inter, hidden, top_k = MODELS[name]
        for tp in args.tp:
            print(f"{name} tp={tp}: E={experts} N={inter // tp} K={hidden} top-k={top_k}", flush=True)
            tuned = tune_shape(experts, inter // tp, hidden, top_k, args.tokens)
            update_table(path, {shape_key(experts, inter // tp, hidden, top_k): tuned})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
