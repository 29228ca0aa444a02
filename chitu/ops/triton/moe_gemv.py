"""The routed experts for a few tokens (decode), as two GEMV kernels with nothing to sort.

With a handful of slots nearly every slot has an expert of its own, so the tensor-core path of
fused_moe.py spends more time aligning slots into blocks, clearing its output and summing the top-k
than in its GEMMs. Here each program of the first kernel reads one slot's expert's gate and up rows
for a band of columns and stores silu(gate) * up; each program of the second reads, for one token
and a band of output columns, the down rows of all its top-k experts at once and sums them with the
routing weights. Three launches fewer, no host sync, and the weights stream as in a dense GEMV.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from chitu.ops.triton import pdl
from chitu.ops.triton.moe_config import GemvConfig

FP8_BLOCK = tl.constexpr(128)  # e4m3 experts: one multiplier per 128 x 128 block of a stack (quant/fp8_block.py)


@triton.jit
def dequantized(w, scale_ptrs, mask, dtype: tl.constexpr):
    """e4m3 codes times their blocks' multipliers, rounded to `dtype` as dequantizing the stack rounds them."""
    return (w.to(tl.float32) * tl.load(scale_ptrs, mask=mask, other=0.0)).to(dtype)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, scale_ptr, ids_ptr, out_ptr, N, K, top_k, first_expert, num_local,
                    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_om, SCALED: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """out[slot, n] = silu(x[token] . W_gate[n]) * (x[token] . W_up[n]) for one slot and a band of n."""
    pdl.let_next_start(PDL)
    pdl.wait_for_previous(PDL)
    slot = tl.program_id(0)
    expert = tl.load(ids_ptr + slot).to(tl.int64) - first_expert
    if (expert < 0) | (expert >= num_local):  # held elsewhere: the second kernel skips the slot
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (slot // top_k) * stride_xm + offs_k
    w_ptrs = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dtype = out_ptr.dtype.element_ty
    gate_scales = scale_ptr + expert * stride_se + (offs_n[:, None] // FP8_BLOCK) * stride_sn
    up_scales = scale_ptr + expert * stride_se + ((offs_n[:, None] + N) // FP8_BLOCK) * stride_sn
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        mask = n_mask[:, None] & k_mask[None, :]
        w_gate = tl.load(w_ptrs, mask=mask, other=0.0)
        w_up = tl.load(w_ptrs + N * stride_wn, mask=mask, other=0.0)
        if SCALED:
            scale_cols = (k0 + offs_k[None, :]) // FP8_BLOCK
            w_gate = dequantized(w_gate, gate_scales + scale_cols, mask, dtype)
            w_up = dequantized(w_up, up_scales + scale_cols, mask, dtype)
        gate += w_gate.to(tl.float32) * x
        up += w_up.to(tl.float32) * x
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    g = tl.sum(gate, axis=1)
    # rounded to the activations' dtype where the torch reference rounds: the projections, then silu
    g = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    activated = g * tl.sum(up, axis=1).to(dtype).to(tl.float32)
    tl.store(out_ptr + slot * stride_om + offs_n, activated.to(dtype), mask=n_mask)


@triton.jit
def _down_kernel(a_ptr, w_ptr, scale_ptr, ids_ptr, routing_ptr, out_ptr, N, K, top_k, first_expert, num_local,
                 stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om, SCALED: tl.constexpr,
                 BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """out[t, n] = sum_j routing[t, j] * (a[slot t*top_k + j] . W_down[expert of the slot][n]), a band of n.
    The top-k experts' rows are read in one [BLOCK_J, BLOCK_N, BLOCK_K] tile, so that enough bytes are in
    flight per program."""
    pdl.let_next_start(PDL)
    pdl.wait_for_previous(PDL)
    token = tl.program_id(0)
    offs_j = tl.arange(0, BLOCK_J)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    slots = token * top_k + offs_j
    experts = tl.load(ids_ptr + slots, mask=offs_j < top_k, other=-1).to(tl.int64) - first_expert
    held = (offs_j < top_k) & (experts >= 0) & (experts < num_local)
    experts = tl.where(held, experts, 0)
    a_ptrs = a_ptr + slots[:, None] * stride_am + offs_k[None, :]
    w_ptrs = (w_ptr + experts[:, None, None] * stride_we + offs_n[None, :, None].to(tl.int64) * stride_wn
              + offs_k[None, None, :])
    rows_mask = held[:, None, None] & n_mask[None, :, None]
    acc = tl.zeros((BLOCK_J, BLOCK_N, BLOCK_K), dtype=tl.float32)
    dtype = out_ptr.dtype.element_ty
    scale_rows = scale_ptr + experts[:, None, None] * stride_se + (offs_n[None, :, None] // FP8_BLOCK) * stride_sn
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        mask = rows_mask & k_mask[None, None, :]
        a = tl.load(a_ptrs, mask=held[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=mask, other=0.0)
        if SCALED:
            w = dequantized(w, scale_rows + (k0 + offs_k[None, None, :]) // FP8_BLOCK, mask, dtype)
        acc += w.to(tl.float32) * a[:, None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    # each expert's output rounded, then weighted and rounded, as the torch reference does before its sum
    y = tl.sum(acc, axis=2).to(dtype).to(tl.float32)
    routing = tl.load(routing_ptr + slots, mask=held, other=0.0)
    terms = (y * routing[:, None]).to(dtype).to(tl.float32)
    tl.store(out_ptr + token * stride_om + offs_n, tl.sum(terms, axis=0).to(dtype), mask=n_mask)


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, first_expert: int, config: GemvConfig, gate_up_scale: torch.Tensor | None = None,
                  down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """As chitu.ops.torch_ref.moe.fused_experts, for x [T, H] bf16/fp16 on CUDA and few tokens; with the scales,
    e4m3 stacks with a multiplier per 128 x 128 block."""
    num_tokens, top_k = ids.shape
    num_local, inter, hidden = gate_up.shape[0], gate_up.shape[1] // 2, x.shape[1]
    assert gate_up.stride(2) == 1 and down.stride(2) == 1 and x.stride(1) == 1
    ids = ids.reshape(-1)
    options = pdl.launch_options(x.device)
    activated = torch.empty(num_tokens * top_k, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(ids.numel(), triton.cdiv(inter, config.up_block_n))](
        x, gate_up, gate_up if gate_up_scale is None else gate_up_scale, ids, activated, inter, hidden, top_k,
        first_expert, num_local, x.stride(0), gate_up.stride(0), gate_up.stride(1), *scale_strides(gate_up_scale),
        activated.stride(0), SCALED=gate_up_scale is not None, BLOCK_N=config.up_block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, **options)
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(num_tokens, triton.cdiv(hidden, config.down_block_n))](
        activated, down, down if down_scale is None else down_scale, ids, weights.reshape(-1).float(), out, hidden,
        inter, top_k, first_expert, num_local, activated.stride(0), down.stride(0), down.stride(1),
        *scale_strides(down_scale), out.stride(0), SCALED=down_scale is not None,
        BLOCK_J=triton.next_power_of_2(top_k), BLOCK_N=config.down_block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, **options)
    return out


def scale_strides(scale: torch.Tensor | None) -> tuple[int, int]:
    """The expert and row-block strides of an e4m3 stack's multipliers [E, row blocks, column blocks]."""
    if scale is None:
        return 0, 0
    assert scale.stride(2) == 1
    return scale.stride(0), scale.stride(1)
