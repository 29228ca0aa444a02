"""The CPU row kernels against torch at decode and prefill sizes: each checked against a float64
product first, then timed (median of repeats), as a table.

- linear: plain float32 / bfloat16 weights (ops/cpu/linear.py) against F.linear in the weight's dtype,
  on an LM head (32000 x 1024, larger than the caches) and a projection (1536 x 1024);
- gguf: GGUF blocks (ops/cpu/gguf.py) at SmolLM2's shapes (an LM head 49152 x 576, projections 1536 x 576, 576 x 1536),
  bfloat16 rows: the integer-dot kernel, the bfloat16 tiles and the float32 GEMM of the dequantized weight
  against the float64 product of gguf's dequantization, which places gguf_linear's crossovers;
- moe: one layer's routed experts (ops/cpu/moe.py; 64 experts of 1024 -> 2 x 256, 8 per token) in float32,
  bfloat16 and W8A16 int8 against the torch reference (ops/torch_ref/moe.py).

    python benchmarks/bench_cpu_kernels.py [--rows 1 4 8 12 32 128] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import gguf
import gguf.quants
import numpy as np
import torch
import torch.nn.functional as F

from chitu.ops.cpu import gguf as gguf_ops
from chitu.ops.cpu import linear as cpu_linear
from chitu.ops.cpu import moe as cpu_moe
from chitu.ops.torch_ref import moe as ref_moe
from chitu.quant.int8 import Int8ExpertStack, dequantize, int8_linear, quantize_per_channel

EXPERTS, TOP_K, HIDDEN, INTER = 64, 8, 1024, 256
GGUF_SHAPES = {"Q4_K": ((576, 1536),)}  # rows of whole super-blocks of 256


def milliseconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def linear_rows(rows: list[int], repeats: int) -> None:
    print(f"{'linear':28}{'rows':>6}{'error':>10}{'kernel ms':>11}{'torch ms':>10}{'kernel GB/s':>13}")
    for dtype in (torch.float32, torch.bfloat16):
        for out_features, in_features in ((32000, 1024), (1536, 1024)):
            weight = (torch.randn(out_features, in_features) / in_features ** 0.5).to(dtype)
            for m in rows:
                x = torch.randn(m, in_features).to(dtype)
                error = relative_error(cpu_linear.plain_linear(x, weight), x.double() @ weight.double().T)
                kernel = milliseconds(lambda: cpu_linear.plain_linear(x, weight), repeats)
                reference = milliseconds(lambda: F.linear(x, weight), repeats)
                name = f"{str(dtype)[6:]} {out_features}x{in_features}"
                print(f"{name:28}{m:>6}{error:>10.1e}{kernel:>11.3f}{reference:>10.3f}{weight.nbytes / kernel / 1e6:>13.1f}")


def gguf_blocks(qtype: str, out_features: int, in_features: int) -> torch.Tensor:
    """Random weights quantized by gguf (Q4_K, which gguf cannot quantize: random bytes under small scales)."""
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype != "Q4_K":
        return torch.from_numpy(gguf.quants.quantize(np.random.randn(out_features, in_features).astype(np.float32), kind))
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = np.random.randint(0, 256, (out_features, in_features // block_values, block_bytes), dtype=np.uint8)
    blocks[..., :4] = np.full((1, 1, 2), 0.01, np.float16).view(np.uint8)  # d, dmin
    return torch.from_numpy(blocks.reshape(out_features, -1))


def gguf_rows(rows: list[int], repeats: int) -> None:
    print(f"\n{'gguf (bf16 rows)':28}{'rows':>6}{'dots ms':>9}{'tiles ms':>10}{'GEMM ms':>9}{'tiles error':>13}")
    kernels = gguf_ops.kernels()
    for qtype in ("Q4_1", "Q8_0", "Q4_K"):
        for out_features, in_features in GGUF_SHAPES.get(qtype, ((49152, 576), (1536, 576))):
            blocks, code = gguf_blocks(qtype, out_features, in_features), gguf_ops.FORMATS[qtype]
            weight = gguf_ops.dequantize(blocks, qtype, in_features)
            for m in rows:
                x = torch.randn(m, in_features).bfloat16()
                dots = milliseconds(lambda: kernels.linear(x, blocks, code, True), repeats)
                gemm = milliseconds(lambda: x.float() @ weight.T, repeats)
                tiles, error = float("nan"), float("nan")
                if gguf_ops.bf16_tiles():
                    tiles = milliseconds(lambda: kernels.linear_bf16_tiles(x, blocks, code), repeats)
                    error = relative_error(kernels.linear_bf16_tiles(x, blocks, code), x.double() @ weight.double().T)
                name = f"{qtype} {out_features}x{in_features}"
                print(f"{name:28}{m:>6}{dots:>9.3f}{tiles:>10.3f}{gemm:>9.3f}{error:>13.1e}")


def experts(dtype: torch.dtype, quantized: bool):
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN) / HIDDEN ** 0.5
    down = torch.randn(EXPERTS, HIDDEN, INTER) / INTER ** 0.5
    if not quantized:
        return gate_up.to(dtype), down.to(dtype), gate_up.to(dtype).double(), down.to(dtype).double()
    stacks = []
    for weights in (gate_up, down):
        q, scale = zip(*(quantize_per_channel(w, dtype) for w in weights))
        stacks.append(Int8ExpertStack.of(torch.stack(q), torch.stack(scale), int8_linear, True))
    return (*stacks, *(dequantize(s.q, s.scale).double() for s in stacks))


def moe_rows(rows: list[int], repeats: int) -> None:
    print(f"\n{'moe':28}{'tokens':>6}{'error':>10}{'kernel ms':>11}{'torch ms':>10}")
    for name, dtype, quantized in (("float32", torch.float32, False), ("bfloat16", torch.bfloat16, False),
                                   ("W8A16 (bf16)", torch.bfloat16, True)):
        gate_up, down, exact_gate_up, exact_down = experts(dtype, quantized)
        for tokens in rows:
            x = torch.randn(tokens, HIDDEN).to(dtype)
            weights, ids = ref_moe.select_experts(torch.randn(tokens, EXPERTS), TOP_K, "softmax", True, None, 1, 1, 1.0)
            args = (x, gate_up, down, weights, ids, 0)
            exact = ref_moe.fused_experts(x.double(), exact_gate_up, exact_down, weights.double(), ids, 0)
            error = relative_error(cpu_moe.fused_experts(*args), exact)
            kernel = milliseconds(lambda: cpu_moe.fused_experts(*args), repeats)
            reference = milliseconds(lambda: ref_moe.fused_experts(*args), repeats)
            print(f"{name:28}{tokens:>6}{error:>10.1e}{kernel:>11.3f}{reference:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    linear_rows(args.rows, args.repeats)
    gguf_rows(args.rows, args.repeats)
    moe_rows(args.rows, args.repeats)


if __name__ == "__main__":
    main()
