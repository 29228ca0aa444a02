"""The routed experts of an MoE layer in two grouped GEMMs, with no host sync (CUDA-graph safe).

Each (token, k) routing pair is a slot t * top_k + k. The slots held by this rank are sorted by
expert and each expert's run padded to a multiple of BLOCK_M (`align_to_blocks`), so that a block
of BLOCK_M sorted slots belongs to one expert. The first GEMM multiplies each slot's token by its
expert's gate and up rows at once and stores silu(gate) * up; the second multiplies that by the
expert's down projection and the slot's routing weight. Summing each token's top_k slots gives the
output. The layout of the slots, the launch configuration and the sizes padded on the device are
all fixed by the token count, so a captured graph replays them for any routing. A few tokens take
the GEMV path of moe_gemv.py instead, where their configuration (moe_config.py) says so.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from chitu.ops.triton import moe_gemv
from chitu.ops.triton.dot import dot
from chitu.ops.triton.moe_config import BlockConfig, GemvConfig, MoEConfig, config_for
from chitu.ops.triton.moe_gemv import FP8_BLOCK, dequantized, scale_strides

FP8_SAFE_BLOCK_K = 64


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
    run = expert_of_sorted.clamp(max=num_local - 1)  # any valid index for the slots not held
    position = torch.where(held, starts[run] + torch.arange(num_slots, device=ids.device) - run_starts[run], 0)
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


MAX_KERNEL_SLOTS = 1024  # align_to_blocks runs as one Triton program up to this many slots (decode)


@triton.jit
def _align_kernel(ids_ptr, sorted_slots_ptr, block_experts_ptr, num_padded_ptr, offsets_ptr,
                  num_slots, first_expert, num_local, max_padded, num_blocks,
                  BLOCK_M: tl.constexpr, SLOTS: tl.constexpr, EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    """align_to_blocks in one program: sort (expert, slot) keys, count each expert's slots, place them."""
    slot = tl.arange(0, SLOTS)
    in_range = slot < num_slots
    local = tl.load(ids_ptr + slot, mask=in_range, other=0).to(tl.int32) - first_expert
    expert = tl.where(in_range & (local >= 0) & (local < num_local), local, num_local)  # num_local: not held
    sorted_keys = tl.sort(expert * SLOTS + slot)
    sorted_expert, sorted_slot = sorted_keys // SLOTS, sorted_keys % SLOTS
    counts = tl.histogram(expert, EXPERTS)
    experts = tl.arange(0, EXPERTS)
    padded = tl.where(experts < num_local, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    ends = tl.cumsum(padded, 0)
    # sorted position j of an expert's slot goes to j + (its run's padded start - its run's start)
    tl.store(offsets_ptr + experts, ends - padded - (tl.cumsum(counts, 0) - counts))
    for start in range(0, max_padded, SLOTS):
        tl.store(sorted_slots_ptr + start + slot, num_slots, mask=start + slot < max_padded)
    tl.debug_barrier()
    held = sorted_expert < num_local
    offset = tl.load(offsets_ptr + sorted_expert, mask=held, other=0)
    tl.store(sorted_slots_ptr + slot + offset, sorted_slot, mask=held)
    for start in range(0, num_blocks, CHUNK):
        block = start + tl.arange(0, CHUNK)
        past = (ends[None, :] <= (block * BLOCK_M)[:, None]) & (experts[None, :] < num_local)
        owner = tl.sum(past.to(tl.int32), axis=1)  # the first expert whose run ends after the block starts
        tl.store(block_experts_ptr + block, tl.where(owner < num_local, owner, -1), mask=block < num_blocks)
    tl.store(num_padded_ptr, tl.sum(padded, 0))


def align_to_blocks_kernel(ids: torch.Tensor, first_expert: int, num_local: int, block_m: int) -> BlockLayout:
    """align_to_blocks in one launch, for at most MAX_KERNEL_SLOTS slots."""
    num_slots = ids.numel()
    max_padded = triton.cdiv(num_slots + num_local * (block_m - 1), block_m) * block_m
    num_blocks = max_padded // block_m
    device = ids.device
    sorted_slots = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_experts = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    experts = triton.next_power_of_2(num_local + 1)
    offsets = torch.empty(experts, dtype=torch.int32, device=device)
    _align_kernel[(1,)](ids.reshape(-1), sorted_slots, block_experts, num_padded, offsets, num_slots, first_expert,
                        num_local, max_padded, num_blocks, BLOCK_M=block_m,
                        SLOTS=triton.next_power_of_2(num_slots), EXPERTS=experts, CHUNK=64, num_warps=8)
    return BlockLayout(sorted_slots, block_experts, num_padded)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, scale_ptr, out_ptr, routing_ptr, sorted_slots_ptr, block_experts_ptr, num_padded_ptr,
    N, K, num_slots, top_k, max_padded, up_offset,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_om, stride_on,
    A_ROWS_ARE_TOKENS: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[slot, n] = (silu(a W_gate^T) * a W_up^T if GATED else a W^T)[n] (* routing[slot]) for the
    slots of one block, all of one expert; a is the slot's token row (A_ROWS_ARE_TOKENS) or its own.
    SCALED: W is e4m3 with a multiplier per 128 x 128 block (scale [E, N blocks, K blocks])."""
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
    scale_rows = scale_ptr + expert * stride_se + (offs_n[None, :] // FP8_BLOCK) * stride_sn
    up_scale_rows = scale_ptr + expert * stride_se + ((offs_n[None, :] + up_offset) // FP8_BLOCK) * stride_sn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        w_mask = k_mask[:, None] & n_mask[None, :]
        scale_cols = (k * BLOCK_K + offs_k[:, None]) // FP8_BLOCK
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if SCALED:
            w = dequantized(w, scale_rows + scale_cols, w_mask, a.dtype)
        acc = dot(a, w, acc)
        if GATED:
            w_up = tl.load(w_ptrs + up_offset * stride_wn, mask=w_mask, other=0.0)
            if SCALED:
                w_up = dequantized(w_up, up_scale_rows + scale_cols, w_mask, a.dtype)
            acc_up = dot(a, w_up, acc_up)
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


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor,
                  layout: BlockLayout, num_slots: int, top_k: int, config: BlockConfig, rows_are_tokens: bool,
                  gated: bool, routing: torch.Tensor | None) -> None:
    n = w.shape[1] // 2 if gated else w.shape[1]
    max_padded = layout.sorted_slots.numel()
    grid = (triton.cdiv(max_padded, config.block_m) * triton.cdiv(n, config.block_n),)
    _grouped_gemm_kernel[grid](
        a, w, w if scale is None else scale, out, routing if routing is not None else out, layout.sorted_slots,
        layout.block_experts, layout.num_padded, n, w.shape[2], num_slots, top_k, max_padded, n,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), *scale_strides(scale),
        out.stride(0), out.stride(1),
        A_ROWS_ARE_TOKENS=rows_are_tokens, GATED=gated, WEIGHTED=routing is not None, SCALED=scale is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages)


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, first_expert: int, config: MoEConfig | None = None,
                  gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """As chitu.ops.torch_ref.moe.fused_experts, for x [T, H] on CUDA. With the scales, the stacks are e4m3 with
    a multiplier per 128 x 128 block (quant/fp8_block.py), dequantized to x's dtype as they are read."""
    num_tokens, top_k = ids.shape
    num_slots = num_tokens * top_k
    inter = gate_up.shape[1] // 2
    config = config or config_for(x.device, gate_up.shape[0], inter, x.shape[1], top_k, num_tokens)
    if isinstance(config, GemvConfig):
        return moe_gemv.fused_experts(x, gate_up, down, weights, ids, first_expert, config, gate_up_scale, down_scale)
    if x.dtype == torch.float32:  # twice the bytes of the (bf16-tuned) tiles: fewer of them in shared memory
        config = dataclasses.replace(config, num_stages=min(config.num_stages, 2))
    if gate_up_scale is not None:
        # e4m3 stacks in 128-deep tiles came out wrong on an H100 (1 and 3 tokens, BlockConfig(16, 64, 128, ...);
        # cause not found yet), 64-deep ones right: test_triton_ops.py::test_fused_moe_of_fp8_block_stacks
        config = dataclasses.replace(config, block_k=min(config.block_k, FP8_SAFE_BLOCK_K))
    align = align_to_blocks_kernel if num_slots <= MAX_KERNEL_SLOTS else align_to_blocks
    layout = align(ids, first_expert, gate_up.shape[0], config.block_m)
    activated = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, gate_up, gate_up_scale, activated, layout, num_slots, top_k, config, rows_are_tokens=True,
                  gated=True, routing=None)
    out = torch.zeros(num_slots, down.shape[1], dtype=x.dtype, device=x.device)  # slots held elsewhere add 0
    _grouped_gemm(activated, down, down_scale, out, layout, num_slots, top_k, config, rows_are_tokens=False,
                  gated=False, routing=weights.flatten().float())
    return out.view(num_tokens, top_k, -1).sum(dim=1)
