"""y = x W^T for int4 weights in groups along the inputs (quant/int4_groups.py: AWQ and GPTQ checkpoints).

W is held as int32 words [K/8, N] (value j of word r is input row 8r + j), a scale (the compute dtype) and
a zero (uint8) per group of GROUP rows and output column: w = (q - zero) * scale. Each program unpacks
and dequantizes its tiles of W in registers and multiplies them with tl.dot, so the weight streams from
memory once at half a byte a value. A K tile never straddles two groups (BLOCK_K divides GROUP), so a
tile needs one row of scales and zeros. Few rows (decode) leave too few output tiles to fill the GPU:
the K loop is then split over programs (SPLIT_K), each writing its float32 partial sums, summed after.
Tiles are chosen by rule, not tuned.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from chitu.ops.triton.dot import dot

BLOCK_KS = (128, 64, 32, 16)  # tl.dot takes K tiles of at least 16


@triton.jit
def _int4_gemm_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_os,
                      TILES_PER_SPLIT, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    words = tl.arange(0, BLOCK_K // 8)
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * TILES_PER_SPLIT
    last = tl.minimum(first + TILES_PER_SPLIT, K // BLOCK_K)
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :],
                    mask=row_mask[:, None], other=0.0)
        packed = tl.load(w_ptr + (k0 // 8 + words)[:, None].to(tl.int64) * N + cols[None, :],
                         mask=col_mask[None, :], other=0)
        q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
        group = k0 // GROUP
        scale = tl.load(scale_ptr + group * N + cols, mask=col_mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + group * N + cols, mask=col_mask, other=0).to(tl.float32)
        w = ((q.to(tl.float32) - zero[None, :]) * scale[None, :]).to(x.dtype)
        acc = dot(x, w, acc)
    out = out_ptr + split * stride_os + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def block_k_for(group_size: int, in_features: int) -> int | None:
    """The K tile for a group size: the largest of BLOCK_KS dividing it; None where none does (the kernel
    cannot take such groups)."""
    return next((b for b in BLOCK_KS if group_size % b == 0 and in_features % b == 0), None)


@lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tiles(m: int, n: int, block_k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by the number of rows; K tiles of at most 64 where x's tile
    is large, so that three stages of it fit in shared memory."""
    if m <= 16:
        return 16, 64 if n >= 64 else 32, block_k, 4
    if m <= 64:
        return 64, 64, min(block_k, 64), 4
    return 128, 128, min(block_k, 64), 8


def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16, fp16 or fp32, CUDA) @ the dequantized W [K, N] → [M, N] in x's dtype, float32 sums.
    weight: int32 [K/8, N]; scales: [K/GROUP, N] in x's dtype; zeros: uint8 [K/GROUP, N]."""
    m, k = x.shape
    n = weight.shape[1]
    group = k // scales.shape[0]
    block_k = block_k_for(group, k)
    if block_k is None:
        raise ValueError(f"int4_matmul takes groups of a multiple of 16 rows, not {group}")
    x = x if x.stride(1) == 1 else x.contiguous()
    block_m, block_n, block_k, num_warps = _tiles(m, n, block_k)
    grid_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    tiles = k // block_k
    # enough programs for every multiprocessor twice over, each still running several K tiles
    sms = _multiprocessors(x.device.index or 0)
    split = max(1, min(tiles // 4, -(-2 * sms // grid_mn))) if m <= 64 else 1
    tiles_per_split = -(-tiles // split)
    split = -(-tiles // tiles_per_split)
    out = torch.empty((split, m, n), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    _int4_gemm_kernel[grid](x, weight, scales, zeros, out, m, n, k, x.stride(0), out.stride(1), out.stride(0),
                            tiles_per_split, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                            num_warps=num_warps, num_stages=2 if x.dtype == torch.float32 else 3)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
