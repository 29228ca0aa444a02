"""The routed experts of an MoE layer in two grouped GEMMs, with no host sync (CUDA-graph safe).

Each (token, k) routing pair is a slot t * top_k + k. The slots held by this rank are sorted by
expert and each expert's run padded to a multiple of BLOCK_M (`align_to_blocks`), so that a block
of BLOCK_M sorted slots belongs to one expert. The first GEMM multiplies each slot's token by its
expert's gate and up rows at once and stores silu(gate) * up; the second multiplies that by the
expert's down projection and the slot's routing weight. Summing each token's top_k slots gives the
output. The layout of the slots, the launch configuration and the sizes padded on the device are
all fixed by the token count, so a captured graph replays them for any routing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def default_config(num_slots: int) -> BlockConfig:
    """A heuristic for any shape: small row blocks while few slots land on each expert (decode)."""
    if num_slots <= 64:
        return BlockConfig(16, 64, 128, 1, 4, 4)
    if num_slots <= 1024:
        return BlockConfig(32, 64, 64, 8, 4, 4)
    return BlockConfig(64, 128, 64, 8, 8, 3)


@dataclass(frozen=True)
class BlockLayout:
    sorted_slots: torch.Tensor   # [max_padded] int32: slots sorted by expert, each run padded with num_slots
    block_experts: torch.Tensor  # [max_padded / block_m] int32: the (local) expert of each block, -1 past the end
    num_padded: torch.Tensor     # [1] int32: how many of sorted_slots are used


def align_to_blocks(ids: torch.Tensor, first_expert: int, num_local: int, block_m: int) -> BlockLayout:
    """Sort this rank's slots by expert and pad each expert's run to whole blocks, all on the device.
    Slots of experts held elsewhere sort past every local expert and are dropped."""
    num_slots = ids.numel()
    local = ids.flatten().to(torch.int64) - first_expert
    local = torch.where((local >= 0) & (local < num_local), local, num_local)  # num_local: not held here
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, local, torch.ones_like(local))
    counts = counts[:num_local]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts, run_starts = ends - padded, counts.cumsum(0) - counts
    order = local.argsort(stable=True)
    expert_of_sorted = local[order]
    held = expert_of_sorted < num_local
    rank_in_run = torch.arange(num_slots, device=ids.device) - run_starts[expert_of_sorted.clamp(max=num_local - 1)]
    position = torch.where(held, starts[expert_of_sorted.clamp(max=num_local - 1)] + rank_in_run, 0)
    max_padded = num_slots + num_local * (block_m - 1)
    max_padded = (max_padded + block_m - 1) // block_m * block_m
    # one spare entry past the end takes the slots not held here
    sorted_slots = torch.full((max_padded + 1,), num_slots, dtype=torch.int32, device=ids.device)
    sorted_slots.scatter_(0, torch.where(held, position, max_padded), order.to(torch.int32))
    sorted_slots = sorted_slots[:max_padded]
    block_starts = torch.arange(0, max_padded, block_m, device=ids.device)
    block_experts = torch.searchsorted(ends, block_starts, right=True)
    block_experts = torch.where(block_experts < num_local, block_experts, -1).to(torch.int32)
    return BlockLayout(sorted_slots, block_experts, ends[-1:].to(torch.int32))


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, routing_ptr, sorted_slots_ptr, block_experts_ptr, num_padded_ptr,
    N, K, num_slots, top_k, max_padded, up_offset,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    A_ROWS_ARE_TOKENS: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[slot, n] = (silu(a W_gate^T) * a W_up^T if GATED else a W^T)[n] (* routing[slot]) for the
    slots of one block, all of one expert; a is the slot's token row (A_ROWS_ARE_TOKENS) or its own."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(max_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + offs_m).to(tl.int64)
    valid = slots < num_slots
    rows = slots // top_k if A_ROWS_ARE_TOKENS else slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        if GATED:
            w_up = tl.load(w_ptrs + up_offset * stride_wn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up = tl.dot(a, w_up, acc_up)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if GATED:
        # silu rounded to the activations' dtype before the product, as the torch reference does
        gate = (acc / (1.0 + tl.exp(-acc))).to(a_ptr.dtype.element_ty).to(tl.float32)
        acc = gate * acc_up.to(a_ptr.dtype.element_ty).to(tl.float32)
    if WEIGHTED:
        acc = acc * tl.load(routing_ptr + slots, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + slots[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, layout: BlockLayout, num_slots: int,
                  top_k: int, config: BlockConfig, rows_are_tokens: bool, gated: bool,
                  routing: torch.Tensor | None) -> None:
    n = w.shape[1] // 2 if gated else w.shape[1]
    max_padded = layout.sorted_slots.numel()
    grid = (triton.cdiv(max_padded, config.block_m) * triton.cdiv(n, config.block_n),)
    _grouped_gemm_kernel[grid](
        a, w, out, routing if routing is not None else out, layout.sorted_slots, layout.block_experts,
        layout.num_padded, n, w.shape[2], num_slots, top_k, max_padded, n,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        A_ROWS_ARE_TOKENS=rows_are_tokens, GATED=gated, WEIGHTED=routing is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages)


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, first_expert: int, config: BlockConfig | None = None) -> torch.Tensor:
    """As chitu.ops.torch_ref.moe.fused_experts, for x [T, H] bf16/fp16 on CUDA."""
    num_tokens, top_k = ids.shape
    num_slots = num_tokens * top_k
    config = config or default_config(num_slots)
    layout = align_to_blocks(ids, first_expert, gate_up.shape[0], config.block_m)
    inter = gate_up.shape[1] // 2
    activated = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, gate_up, activated, layout, num_slots, top_k, config, rows_are_tokens=True, gated=True,
                  routing=None)
    out = torch.zeros(num_slots, down.shape[1], dtype=x.dtype, device=x.device)  # slots held elsewhere add 0
    _grouped_gemm(activated, down, out, layout, num_slots, top_k, config, rows_are_tokens=False, gated=False,
                  routing=weights.flatten().float())
    return out.view(num_tokens, top_k, -1).sum(dim=1)
