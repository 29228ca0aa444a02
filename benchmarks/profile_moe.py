"""Where the fused MoE's time goes at decode sizes: each CUDA kernel's time in one call (torch.profiler),
and the call replayed from a CUDA graph (no launch overhead) against the bytes it must read.

    python benchmarks/profile_moe.py [--tokens 1 16 64]
"""
from __future__ import annotations

import argparse

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from chitu.ops.torch_ref import moe as ref_moe
from chitu.ops.triton import fused_moe

EXPERTS, TOP_K, HIDDEN, INTER = 128, 8, 2048, 768  # Qwen3-30B-A3B


def case(tokens: int):
    x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, device="cuda")
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, dtype=torch.bfloat16, device="cuda") / HIDDEN**0.5
    down = torch.randn(EXPERTS, HIDDEN, INTER, dtype=torch.bfloat16, device="cuda") / INTER**0.5
    weights, ids = ref_moe.select_experts(torch.randn(tokens, EXPERTS, device="cuda"), TOP_K, "softmax", True,
                                          None, 1, 1, 1.0)
    touched = ids.unique().numel() * (gate_up[0].nbytes + down[0].nbytes)
    return (x, gate_up, down, weights, ids, 0), touched


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    for tokens in args.tokens:
        inputs, touched = case(tokens)
        fused_moe.fused_experts(*inputs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fused_moe.fused_experts(*inputs)
        graph_us = triton.testing.do_bench(graph.replay, return_mode="median") * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fused_moe.fused_experts(*inputs)
            torch.cuda.synchronize()
        print(f"\nT={tokens}: graph replay {graph_us:.1f} us, experts' bytes {touched / 1e6:.1f} MB "
              f"= {touched / graph_us / 1e3:.0f} GB/s")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
