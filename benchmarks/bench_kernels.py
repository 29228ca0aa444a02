"""Each Triton kernel against its torch reference at realistic shapes (bf16, one CUDA GPU).

    python benchmarks/bench_kernels.py [--only gemv rotary ...]

Times are medians of triton.testing.do_bench (which flushes L2 between runs). GB/s counts each input
read once and each output written once, set beside the bandwidth of a large device-to-device copy
measured in the same run (bytes read + written); prefill attention reports TFLOP/s instead.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from chitu.ops.attention_metadata import AttentionMetadata
from chitu.ops import attention as attention_ops
from chitu.ops import linear as linear_ops
from chitu.ops.torch_ref import activation as ref_activation
from chitu.ops.torch_ref import attention as ref_attention
from chitu.ops.torch_ref import moe as ref_moe
from chitu.ops.torch_ref import norm as ref_norm
from chitu.ops.torch_ref import rotary as ref_rotary
from chitu.ops.triton import activation, attention, fp8_gemm, fused_moe, gemv, norm, rotary

DTYPE = torch.bfloat16
TOKENS = 8192  # a large prefill step
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128  # Llama-3-8B
BLOCK_SIZE = 64


@dataclass
class Case:
    kernel: str
    shape: str
    triton_fn: Callable[[], object]
    torch_fn: Callable[[], object]
    bytes_moved: int = 0  # the fewest bytes moved; 0 when compute-bound
    flops: int = 0


def median_ms(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def randn(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device="cuda")


def copy_gbps() -> float:
    src = randn(1 << 29)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.nbytes / median_ms(lambda: dst.copy_(src)) / 1e6


def elementwise_cases() -> list[Case]:
    x, residual, weight = randn(TOKENS, HIDDEN), randn(TOKENS, HIDDEN), randn(HIDDEN)
    qkv = randn(TOKENS, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q = qkv[:, : HEADS * HEAD_DIM].view(TOKENS, HEADS, HEAD_DIM)
    head_weight = randn(HEAD_DIM)
    angles = torch.rand(TOKENS, HEAD_DIM // 2, device="cuda") * 1000
    cos, sin = angles.cos(), angles.sin()
    cos_half, sin_half = cos[:, : HEAD_DIM // 4].contiguous(), sin[:, : HEAD_DIM // 4].contiguous()
    gate_up = randn(TOKENS, 2 * INTERMEDIATE)
    qk = qkv[:, : (HEADS + KV_HEADS) * HEAD_DIM].view(TOKENS, HEADS + KV_HEADS, HEAD_DIM)
    qk_norm = (head_weight, randn(HEAD_DIM), HEADS, 1e-6)
    act = x.nbytes
    q_bytes = q.numel() * q.element_size()
    return [
        Case("rms_norm", f"[{TOKENS}, {HIDDEN}]", lambda: norm.rms_norm(x, weight, 1e-6),
             lambda: ref_norm.rms_norm(x, weight, 1e-6), 2 * act),
        Case("add_rms_norm", f"[{TOKENS}, {HIDDEN}]", lambda: norm.add_rms_norm(x, residual, weight, 1e-6),
             lambda: ref_norm.add_rms_norm(x, residual, weight, 1e-6), 4 * act),
        Case("rms_norm per head (strided q)", f"[{TOKENS}, {HEADS}, {HEAD_DIM}]",
             lambda: norm.rms_norm(q, head_weight, 1e-6), lambda: ref_norm.rms_norm(q, head_weight, 1e-6),
             2 * q_bytes),
        Case("rotary neox (strided q)", f"[{TOKENS}, {HEADS}, {HEAD_DIM}]",
             lambda: rotary.apply_rotary(q, cos, sin, False), lambda: ref_rotary.apply_rotary(q, cos, sin, False),
             2 * q_bytes + 2 * cos.nbytes),
        Case("rms_norm + rotary of q and k", f"[{TOKENS}, {HEADS}+{KV_HEADS}, {HEAD_DIM}]",
             lambda: rotary.apply_rotary(qk, cos, sin, False, norm=qk_norm),
             lambda: ref_rotary.apply_rotary(qk, cos, sin, False, qk_norm), 2 * qk.numel() * qk.element_size()),
        Case("rotary interleaved, half", f"[{TOKENS}, {HEADS}, {HEAD_DIM}]",
             lambda: rotary.apply_rotary(q, cos_half, sin_half, True),
             lambda: ref_rotary.apply_rotary(q, cos_half, sin_half, True), 2 * q_bytes + 2 * cos_half.nbytes),
        Case("silu_and_mul", f"[{TOKENS}, 2x{INTERMEDIATE}]", lambda: activation.silu_and_mul(gate_up),
             lambda: ref_activation.silu_and_mul(gate_up), gate_up.nbytes * 3 // 2),
    ]


def paged(query_lens: list[int], context_lens: list[int]):
    """q, random caches and metadata over shuffled blocks."""
    blocks = [-(-n // BLOCK_SIZE) for n in context_lens]
    order = torch.randperm(sum(blocks)).tolist()
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    tables = [order[s: s + n] for s, n in zip(starts, blocks)]
    k_cache = randn(sum(blocks), BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    v_cache = randn(sum(blocks), BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, "cuda")
    return randn(sum(query_lens), HEADS, HEAD_DIM), k_cache, v_cache, meta


def decode_case(batch: int, context: int) -> Case:
    q, k_cache, v_cache, meta = paged([1] * batch, [context] * batch)
    scale = HEAD_DIM**-0.5
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * k_cache.element_size()
    return Case("decode attention", f"B={batch} ctx={context} H={HEADS}/{KV_HEADS} d={HEAD_DIM}",
                lambda: attention.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale),
                lambda: ref_attention.paged_attention(q, k_cache, v_cache, meta, scale), kv_bytes + 2 * q.nbytes)


def latent_decode_case(batch: int, context: int, heads: int, latent: int = 512, rope: int = 64) -> Case:
    """MLA decode over the latent cache (DeepSeek-V3: 128 heads, 16 a rank at tp 8). Bytes: the cache read once."""
    blocks = batch * -(-context // BLOCK_SIZE)
    cache = randn(blocks, BLOCK_SIZE, latent + rope)
    tables = torch.randperm(blocks).view(batch, -1).tolist()
    meta = AttentionMetadata.build([1] * batch, [context] * batch, tables, BLOCK_SIZE, "cuda")
    q, scale = randn(batch, heads, latent + rope), (latent + rope)**-0.5
    return Case("MLA latent decode", f"B={batch} ctx={context} H={heads} d={latent}+{rope}",
                lambda: attention_ops.latent_attention(q, cache, meta, latent, scale),
                lambda: attention_ops.latent_attention(q, cache, meta, latent, scale, backend="ref"),
                cache.nbytes + 2 * q.nbytes)


def prefill_case(query_lens: list[int], context_lens: list[int]) -> Case:
    q, k_cache, v_cache, meta = paged(query_lens, context_lens)
    scale = HEAD_DIM**-0.5
    # q·k and p·v over the visible (causal) pairs only
    pairs = sum(q_len * (ctx - q_len) + q_len * (q_len + 1) // 2 for q_len, ctx in zip(query_lens, context_lens))
    return Case("prefill attention", f"q={query_lens} ctx={context_lens}",
                lambda: attention.prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                    meta.query_start_loc, meta.max_query_len, scale),
                lambda: ref_attention.paged_attention(q, k_cache, v_cache, meta, scale),
                flops=4 * pairs * HEADS * HEAD_DIM)


def gemv_case(name: str, n: int, k: int) -> Case:
    """One row times a weight matrix: the batch-1 decode projections, against cuBLAS (F.linear)."""
    x, w = randn(1, k), randn(n, k)
    return Case("gemv " + name, f"[1, {k}] x [{n}, {k}]^T", lambda: gemv.gemv(x, w),
                lambda: torch.nn.functional.linear(x, w), w.nbytes)


def router_case(experts: int, hidden: int) -> Case:
    """A batch-1 MoE router: bf16 activations times a float32 weight, against the cast and cuBLAS."""
    x, w = randn(1, hidden), randn(experts, hidden, dtype=torch.float32)
    return Case("router logits", f"[1, {hidden}] x [{experts}, {hidden}]^T fp32", lambda: linear_ops.float_linear(x, w),
                lambda: torch.nn.functional.linear(x.float(), w), w.nbytes)


def moe_case(name: str, tokens: int, experts: int, top_k: int, hidden: int, inter: int) -> Case:
    """One MoE layer's routed experts (gate/up, SiLU, down, routing weights, top-k sum). Bytes: the
    distinct experts this routing touches, read once, plus the activations."""
    x = randn(tokens, hidden)
    gate_up, down = randn(experts, 2 * inter, hidden) / hidden**0.5, randn(experts, hidden, inter) / inter**0.5
    weights, ids = ref_moe.select_experts(randn(tokens, experts, dtype=torch.float32), top_k, "softmax", True,
                                          None, 1, 1, 1.0)
    touched = ids.unique().numel()
    expert_bytes = (gate_up[0].nbytes + down[0].nbytes) * touched
    return Case(f"fused MoE {name}", f"T={tokens} E={experts} k={top_k} H={hidden} I={inter}",
                lambda: fused_moe.fused_experts(x, gate_up, down, weights, ids, 0),
                lambda: ref_moe.fused_experts(x, gate_up, down, weights, ids, 0), expert_bytes + 2 * x.nbytes)


def moe_cases() -> list[Case]:
    shapes = {"Qwen3-30B-A3B": (128, 8, 2048, 768), "Mixtral-8x7B": (8, 2, 4096, 14336),
              "DeepSeek-V3 tp8": (256, 8, 7168, 256)}
    return [moe_case(name, tokens, *shape) for name, shape in shapes.items() for tokens in (1, 16, 64, 256)]


def decode_projection_cases() -> list[Case]:
    return [gemv_case("LM head", 128256, 4096), gemv_case("qkv_proj", 6144, 4096), gemv_case("o_proj", 4096, 4096),
            gemv_case("gate_up_proj", 28672, 4096), gemv_case("down_proj", 4096, 14336),
            gemv_case("Qwen3-30B-A3B qkv", 5120, 2048), gemv_case("Qwen3-30B-A3B o_proj", 2048, 4096),
            router_case(128, 2048)]


def fp8_gemm_case(name: str, m: int, n: int, k: int) -> Case:
    """W8A8 with 128 x 128 weight blocks (activation quantization included) against the bf16 GEMM of the same
    shape: the "speedup" is the fp8 rate over the bf16 one. One row reports the weight bytes streamed."""
    weight = (randn(n, k, dtype=torch.float32) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-n // 128), -(-k // 128), device="cuda") * 1e-3
    x, dense = randn(m, k), randn(n, k)
    return Case(f"fp8 gemm {name}", f"M={m} [{n}, {k}]",
                lambda: fp8_gemm.block_fp8_linear(x, weight, scale, (128, 128)),
                lambda: torch.nn.functional.linear(x, dense),
                bytes_moved=weight.nbytes if m == 1 else 0, flops=2 * m * n * k)


def fp8_gemm_cases() -> list[Case]:
    """DeepSeek-V3's projection shapes (whole, as on one GPU)."""
    shapes = {"V3 q_a_proj": (1536, 7168), "V3 q_b_proj": (24576, 1536), "V3 kv_a_proj": (576, 7168),
              "V3 o_proj": (7168, 16384), "V3 gate_up_proj": (36864, 7168), "V3 down_proj": (7168, 18432)}
    return [fp8_gemm_case(name, m, *shape) for m in (1, 64, 4096) for name, shape in shapes.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=[], help="the cases whose kernel name has one of these words")
    args = parser.parse_args()
    torch.manual_seed(0)
    copy = copy_gbps()
    cases = elementwise_cases() + decode_projection_cases() + [
        decode_case(64, 4096), decode_case(256, 1024), decode_case(8, 32768), decode_case(1, 8192), decode_case(1, 256),
        prefill_case([2048], [2048]), prefill_case([512] * 4, [2048] * 4),
        latent_decode_case(64, 4096, 16), latent_decode_case(64, 4096, 128), latent_decode_case(1, 4096, 16)] + moe_cases() + fp8_gemm_cases()
    cases = [c for c in cases if not args.only or any(word in c.kernel for word in args.only)]
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {copy:.0f} GB/s (read + write)")
    print(f"{'kernel':<30} {'shape':<40} {'triton µs':>10} {'torch µs':>10} {'speedup':>8}  achieved")
    for case in cases:
        ms, ref_ms = median_ms(case.triton_fn), median_ms(case.torch_fn)
        if case.bytes_moved:
            gbps = case.bytes_moved / ms / 1e6
            achieved = f"{gbps:.0f} GB/s ({gbps / copy:.0%} of copy)"
        else:
            achieved = f"{case.flops / ms / 1e9:.0f} TFLOP/s"
        print(f"{case.kernel:<30} {case.shape:<40} {ms * 1e3:>10.1f} {ref_ms * 1e3:>10.1f} "
              f"{ref_ms / ms:>7.1f}x  {achieved}")


if __name__ == "__main__":
    main()
