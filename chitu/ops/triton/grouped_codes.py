"""y = x W^T for quantized rows W in quant/grouped_codes.py's layout: GGUF blocks (Q4_0 … Q6_K) and int8 rows.

A single row (batch-1 decode) takes the GEMV: a program reduces a band of W's rows, 32-value groups at a time,
meeting the codes as they are (x · q per group, then the group's scale and min once), so the reads are the
quantized bytes and little else. More rows take the GEMM: each tile of W is dequantized into registers in x's
dtype and multiplied with tl.dot. The codes of a `low` byte are values t and t + 16 of a group; the k order of a
tile does not matter to a dot, so x is read in the same order (x_lo, x_hi) instead of reordering the codes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from chitu.ops.triton.codes_gemv import codes_gemv, supports as codes_gemv_supports
from chitu.quant.grouped_codes import GroupedCodes


@triton.jit
def _code_pairs(low_ptr, high_ptr, low_rows, high_rows, pair, mask, BITS: tl.constexpr):
    """(q_lo, q_hi) int32: the codes of values t and t + 16 of the group of each `pair` index (group * 16 + t),
    at the row offsets low_rows / high_rows (broadcast against pair)."""
    if BITS == 8:
        cols = pair // 16 * 32 + pair % 16
        q_lo = tl.load(low_ptr + low_rows + cols, mask=mask, other=0).to(tl.int32)
        q_hi = tl.load(low_ptr + low_rows + cols + 16, mask=mask, other=0).to(tl.int32)
    else:
        byte = tl.load(low_ptr + low_rows + pair, mask=mask, other=0).to(tl.int32)
        q_lo = byte & 15
        q_hi = byte >> 4
        if BITS > 4:
            EXTRA: tl.constexpr = BITS - 4
            PER_BYTE: tl.constexpr = 8 // (2 * EXTRA)
            extra = tl.load(high_ptr + high_rows + pair // PER_BYTE, mask=mask, other=0).to(tl.int32)
            extra = (extra >> (pair % PER_BYTE * 2 * EXTRA)) & ((1 << 2 * EXTRA) - 1)
            q_lo = q_lo | ((extra & ((1 << EXTRA) - 1)) << 4)
            q_hi = q_hi | ((extra >> EXTRA) << 4)
    return q_lo, q_hi


@triton.jit
def _group_factors(d_ptr, scales_ptr, dmin_ptr, mins_ptr, rows, group, mask, K,
                   GROUP: tl.constexpr, SUPER: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_DMIN: tl.constexpr,
                   HAS_MINS: tl.constexpr):
    """(scale of values t, scale of values t + 16, min) float32 of the 32-value `group`s at `rows` (each field
    contiguous: K // SUPER values a row of d and dmin, K // GROUP of scales, K // 32 of mins)."""
    d_stride = K // SUPER
    scales_stride = K // GROUP
    dmin_stride = K // SUPER
    mins_stride = K // 32
    super_block = group * 32 // SUPER
    d = tl.load(d_ptr + rows * d_stride + super_block, mask=mask, other=0.0).to(tl.float32)
    scale_lo = d
    scale_hi = d
    if HAS_SCALES:
        if GROUP == 32:
            scale_lo = d * tl.load(scales_ptr + rows * scales_stride + group, mask=mask, other=0).to(tl.float32)
            scale_hi = scale_lo
        else:  # 16 values a scale: t and t + 16 have their own
            scale_lo = d * tl.load(scales_ptr + rows * scales_stride + 2 * group, mask=mask, other=0).to(tl.float32)
            scale_hi = d * tl.load(scales_ptr + rows * scales_stride + 2 * group + 1, mask=mask,
                                   other=0).to(tl.float32)
    minimum = tl.zeros_like(d)
    if HAS_DMIN:
        minimum = tl.load(dmin_ptr + rows * dmin_stride + super_block, mask=mask, other=0.0).to(tl.float32)
        if HAS_MINS:
            minimum = minimum * tl.load(mins_ptr + rows * mins_stride + group, mask=mask, other=0).to(tl.float32)
    return scale_lo, scale_hi, minimum


@triton.jit
def _gemv_kernel(x_ptr, low_ptr, high_ptr, d_ptr, scales_ptr, dmin_ptr, mins_ptr, out_ptr, N, K,
                 low_stride, high_stride, BITS: tl.constexpr, OFFSET: tl.constexpr, GROUP: tl.constexpr,
                 SUPER: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_DMIN: tl.constexpr, HAS_MINS: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    t = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    for k0 in range(0, K, 32 * GROUPS):
        group = k0 // 32 + tl.arange(0, GROUPS)
        group_mask = group < K // 32
        cols = group[:, None] * 32 + t[None, :]
        x_lo = tl.load(x_ptr + cols, mask=group_mask[:, None], other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + cols + 16, mask=group_mask[:, None], other=0.0).to(tl.float32)
        mask3 = row_mask[:, None, None] & group_mask[None, :, None]
        q_lo, q_hi = _code_pairs(low_ptr, high_ptr, rows[:, None, None].to(tl.int64) * low_stride,
                                 rows[:, None, None].to(tl.int64) * high_stride,
                                 (group[:, None] * 16 + t[None, :])[None, :, :], mask3, BITS)
        dot_lo = tl.sum(q_lo.to(tl.float32) * x_lo[None, :, :], axis=2)
        dot_hi = tl.sum(q_hi.to(tl.float32) * x_hi[None, :, :], axis=2)
        sum_lo = tl.sum(x_lo, axis=1)[None, :]
        sum_hi = tl.sum(x_hi, axis=1)[None, :]
        if OFFSET != 0:
            dot_lo -= OFFSET * sum_lo
            dot_hi -= OFFSET * sum_hi
        scale_lo, scale_hi, minimum = _group_factors(
            d_ptr, scales_ptr, dmin_ptr, mins_ptr, rows[:, None].to(tl.int64), group[None, :],
            row_mask[:, None] & group_mask[None, :], K, GROUP, SUPER, HAS_SCALES, HAS_DMIN, HAS_MINS)
        acc += scale_lo * dot_lo + scale_hi * dot_hi - minimum * (sum_lo + sum_hi)
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _gemm_kernel(x_ptr, x_stride, low_ptr, high_ptr, d_ptr, scales_ptr, dmin_ptr, mins_ptr, out_ptr,
                 out_stride, M, N, K, low_stride, high_stride, BITS: tl.constexpr, OFFSET: tl.constexpr,
                 GROUP: tl.constexpr, SUPER: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_DMIN: tl.constexpr,
                 HAS_MINS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_mask = rn < N
    rows = rn[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        pair = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        cols = pair // 16 * 32 + pair % 16
        k_mask = cols < K
        x_mask = (rm < M)[:, None] & k_mask[None, :]
        x_rows = x_ptr + rm[:, None].to(tl.int64) * x_stride + cols[None, :]
        x_lo = tl.load(x_rows, mask=x_mask, other=0.0)
        x_hi = tl.load(x_rows + 16, mask=x_mask, other=0.0)
        w_mask = rn_mask[:, None] & k_mask[None, :]
        q_lo, q_hi = _code_pairs(low_ptr, high_ptr, rows * low_stride, rows * high_stride, pair[None, :], w_mask,
                                 BITS)
        scale_lo, scale_hi, minimum = _group_factors(d_ptr, scales_ptr, dmin_ptr, mins_ptr, rows,
                                                     (pair // 16)[None, :], w_mask, K, GROUP, SUPER, HAS_SCALES,
                                                     HAS_DMIN, HAS_MINS)
        w_lo = (scale_lo * (q_lo - OFFSET).to(tl.float32) - minimum).to(x_lo.dtype)
        w_hi = (scale_hi * (q_hi - OFFSET).to(tl.float32) - minimum).to(x_lo.dtype)
        acc = tl.dot(x_lo, tl.trans(w_lo), acc, input_precision=PRECISION)
        acc = tl.dot(x_hi, tl.trans(w_hi), acc, input_precision=PRECISION)
    out = out_ptr + rm[:, None].to(tl.int64) * out_stride + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & rn_mask[None, :])


# A decode GEMV is bound by the bytes in flight: the loop's loads are not pipelined, so each iteration waits for
# memory once; tiles of many groups (up to 128: a 4096-wide row in one iteration) keep more bytes outstanding.
GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "GROUPS": g}, num_warps=w, num_stages=s) for n, g, w, s in [
    (4, 8, 4, 3), (8, 8, 4, 3), (8, 4, 4, 4), (16, 4, 4, 3), (4, 16, 4, 3), (8, 16, 8, 3), (16, 8, 8, 3),
    (2, 16, 4, 3), (32, 4, 8, 3), (16, 16, 8, 3), (32, 8, 8, 3), (8, 32, 8, 3), (16, 16, 4, 4),
    (2, 64, 4, 2), (4, 64, 8, 2), (2, 128, 8, 1), (4, 32, 4, 3), (1, 128, 4, 1), (8, 64, 8, 2)]]
GEMM_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in [
    (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (32, 128, 4, 4), (64, 256, 8, 3)]]
_gemv = triton.autotune(GEMV_CONFIGS, key=["N", "K", "BITS"])(_gemv_kernel)
_gemm = triton.autotune(GEMM_CONFIGS, key=["N", "K", "BITS", "BLOCK_M"])(_gemm_kernel)


def _operands(w: GroupedCodes) -> tuple[list[torch.Tensor], tuple[int, int], dict]:
    """The fields as kernel arguments (absent ones stand in as d, never read), the code planes' row strides and the
    format's constants."""
    fields = [w.low, w.high] + [w.d, w.scales, w.dmin, w.mins]
    row_strides = (w.low.stride(0), w.high.stride(0) if w.high is not None else 0)
    flags = dict(BITS=w.bits, OFFSET=w.offset, GROUP=w.group, SUPER=w.super_block, HAS_SCALES=w.scales is not None,
                 HAS_DMIN=w.dmin is not None, HAS_MINS=w.mins is not None)
    return [t if t is not None else w.d for t in fields], row_strides, flags


def float_gemv(row: torch.Tensor, w: GroupedCodes) -> torch.Tensor:
    """row [1, k] (W dequantized)^T → [1, n]: the codes met as they are, in float32 (any bit width)."""
    n, k = w.shape
    out = torch.empty(1, n, dtype=row.dtype, device=row.device)
    operands, row_strides, flags = _operands(w)
    _gemv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](row, *operands, out, n, k, *row_strides, **flags)
    return out


def grouped_codes_linear(x: torch.Tensor, w: GroupedCodes) -> torch.Tensor:
    """x [..., k] (W dequantized)^T → [..., n] in x's dtype, float32 sums (one row of 4- or 8-bit codes: x rounded to
    int8, ops/triton/codes_gemv.py)."""
    n, k = w.shape
    rows = x.reshape(-1, k).contiguous()
    m = rows.shape[0]
    if m == 1:
        out = codes_gemv(rows, w) if codes_gemv_supports(w) else float_gemv(rows, w)
        return out.view(*x.shape[:-1], n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    operands, row_strides, flags = _operands(w)
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    _gemm[lambda meta: (triton.cdiv(m, block_m), triton.cdiv(n, meta["BLOCK_N"]))](
        rows, rows.stride(0), *operands, out, out.stride(0), m, n, k, *row_strides, **flags,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=block_m)
    return out.view(*x.shape[:-1], n)
