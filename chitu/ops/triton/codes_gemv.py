"""y = x W^T for one row x and 4- or 8-bit GroupedCodes W (Q4_0, Q4_1, Q4_K, Q8_0, int8 rows): integer dot products.

A batch-1 decode GEMV must turn codes into products at the rate the memory delivers them (~30 codes per clock per
SM on an H200), and converting each code to a float (16 conversions per clock per SM) cannot. So, as llama.cpp's
and vLLM's GGUF kernels do, each program quantizes x to int8 per 32 values (x ≈ dx * x8, dx = max|x| / 127) and
multiplies four codes by four x8 at a time with dp4a, the codes as stored: a 32-bit word of 4-bit codes holds
values t (low nibbles) and t + 16 (high nibbles) of four bytes of one group (quant/grouped_codes.py), so two masks
give two words of four codes each, matching the x8 words of values t and t + 16. Each group's integer sum then
takes the group's scale and min once:

    y[n] = sum over groups g of dx[g] * (scale[n, g] * (dot[n, g] - offset * sum(x8[g])) - min[n, g] * sum(x8[g]))

i.e. exactly the dequantized W times x rounded to int8 per 32 values (`reference`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from chitu.quant.grouped_codes import GroupedCodes

ROUNDING = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it rounds a float below 2**22 to the integer in its low bits
ROUNDING_BITS = tl.constexpr(0x4B400000)


@triton.jit
def _dp4a(a, b, acc, SIGNED_A: tl.constexpr, EMULATED: tl.constexpr):
    """acc + the dot product of the four bytes of a and of b (b signed; a signed if SIGNED_A), per element."""
    if EMULATED:  # the interpreter runs no PTX
        for i in tl.static_range(4):
            a_byte = (a << (24 - 8 * i)) >> 24 if SIGNED_A else (a >> (8 * i)) & 255
            acc += a_byte * ((b << (24 - 8 * i)) >> 24)
        return acc
    if SIGNED_A:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc], dtype=tl.int32,
                                         is_pure=True, pack=1)
    return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _rounded_x(x_ptr, group, group_mask, start: tl.constexpr):
    """x at values start + 4w + b (w, b < 4) of each 32-value `group` [G, 4, 4] in float32."""
    cols = group[:, None, None] * 32 + start + tl.arange(0, 4)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    return tl.load(x_ptr + cols, mask=group_mask[:, None, None], other=0.0).to(tl.float32)


@triton.jit
def _x8_words(x, inverse):
    """(x * inverse rounded to int8 [G, 4, 4], as words of four bytes [G, 4]; the sum of the int8 values [G])."""
    rounded = (x * inverse[:, None, None] + ROUNDING).to(tl.int32, bitcast=True)
    words = tl.sum((rounded & 255) << (tl.arange(0, 4) * 8)[None, None, :], axis=2)  # disjoint bytes: the sum packs
    return words, tl.sum(tl.sum(rounded - ROUNDING_BITS, axis=2), axis=1)


@triton.jit
def _quantized_x(x_ptr, group, group_mask):
    """x of each 32-value `group` rounded to int8: words of values 4w .. 4w + 3 (w < 4) and 16 + 4w .. 16 + 4w + 3
    [G, 4] each (the pairs of the low and high nibbles of 4-bit codes; together the 8-bit codes' words), dx [G] and
    sum(x8) [G]."""
    x_lo = _rounded_x(x_ptr, group, group_mask, 0)
    x_hi = _rounded_x(x_ptr, group, group_mask, 16)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x_lo), axis=2), axis=1), tl.max(tl.max(tl.abs(x_hi), axis=2), axis=1))
    inverse = tl.where(amax > 0, 127.0 / amax, 0.0)
    words_lo, sum_lo = _x8_words(x_lo, inverse)
    words_hi, sum_hi = _x8_words(x_hi, inverse)
    return words_lo, words_hi, amax / 127.0, sum_lo + sum_hi


@triton.jit
def _gemv_kernel(x_ptr, words_ptr, d_ptr, scales_ptr, dmin_ptr, mins_ptr, out_ptr, N, K, words_stride,
                 BITS: tl.constexpr, OFFSET: tl.constexpr, SUPER: tl.constexpr, HAS_SCALES: tl.constexpr,
                 HAS_DMIN: tl.constexpr, HAS_MINS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                 EMULATED: tl.constexpr):
    WORDS: tl.constexpr = BITS  # 32-bit words of codes a group of 32 values takes
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    r3 = rows[:, None, None].to(tl.int64)
    code_rows = words_ptr + r3 * words_stride + tl.arange(0, 4)[None, None, :]
    acc = tl.zeros((BLOCK_N, GROUPS, 1), dtype=tl.float32)
    for k0 in range(0, K // 32, GROUPS):
        group = k0 + tl.arange(0, GROUPS)
        group_mask = group < K // 32
        x8_lo, x8_hi, dx, x8_sum = _quantized_x(x_ptr, group, group_mask)
        g3 = group[None, :, None]
        mask = row_mask[:, None, None] & group_mask[None, :, None]
        codes = tl.load(code_rows + g3 * WORDS, mask=mask, other=0)
        if BITS == 8:  # words 0-3 hold values 0-15, words 4-7 values 16-31
            dots = _dp4a(codes, x8_lo[None, :, :], tl.zeros_like(codes), True, EMULATED)
            codes_hi = tl.load(code_rows + g3 * WORDS + 4, mask=mask, other=0)
            dots = _dp4a(codes_hi, x8_hi[None, :, :], dots, True, EMULATED)
        else:  # the low nibbles hold values 0-15, the high ones values 16-31
            dots = _dp4a(codes & 0x0F0F0F0F, x8_lo[None, :, :], tl.zeros_like(codes), False, EMULATED)
            dots = _dp4a((codes >> 4) & 0x0F0F0F0F, x8_hi[None, :, :], dots, False, EMULATED)
        dot = tl.sum(dots, axis=2, keep_dims=True)
        x8_sum = x8_sum[None, :, None]
        if OFFSET != 0:
            dot -= OFFSET * x8_sum
        super_block = r3 * (K // SUPER) + g3 * 32 // SUPER
        scale = tl.load(d_ptr + super_block, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALES:
            scale *= tl.load(scales_ptr + r3 * (K // 32) + g3, mask=mask, other=0).to(tl.float32)
        term = scale * dot.to(tl.float32)
        if HAS_DMIN:
            minimum = tl.load(dmin_ptr + super_block, mask=mask, other=0.0).to(tl.float32)
            if HAS_MINS:
                minimum *= tl.load(mins_ptr + r3 * (K // 32) + g3, mask=mask, other=0).to(tl.float32)
            term -= minimum * x8_sum.to(tl.float32)
        acc += term * dx[None, :, None]
    acc = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


# More rows a program share its x rounding (and a thread its x8 words): fewer instructions a code, but fewer programs
# for the GPU's SMs; the best trade differs per shape, so each is autotuned.
CONFIGS = [triton.Config({"BLOCK_N": n, "GROUPS": g}, num_warps=w) for n, g, w in [
    (16, 16, 4), (8, 16, 4), (32, 8, 4), (16, 8, 4), (8, 32, 4), (16, 32, 8), (32, 16, 8), (4, 32, 4),
    (32, 16, 4), (64, 16, 8), (32, 32, 8)]]
_autotuned = triton.autotune(CONFIGS, key=["N", "K", "BITS"])(_gemv_kernel)


def supports(w: GroupedCodes) -> bool:
    """Whether the integer GEMV takes w: 4-bit codes or 8-bit ones, in groups of 32 values."""
    return w.bits in (4, 8) and w.high is None and (w.scales is None or w.group == 32)


def codes_gemv(x: torch.Tensor, w: GroupedCodes, tile: dict | None = None) -> torch.Tensor:
    """x [1, k] (W dequantized)^T → [1, n] in x's dtype, x rounded to int8 per 32 values (see `reference`)."""
    n, k = w.shape
    assert supports(w) and k % 32 == 0 and w.low.stride(0) % 4 == 0
    words = w.low.view(torch.int32)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    fields = [t if t is not None else w.d for t in (w.d, w.scales, w.dmin, w.mins)]
    args = (x.reshape(1, k).contiguous(), words, *fields, out, n, k, words.stride(0))
    flags = dict(BITS=w.bits, OFFSET=w.offset, SUPER=w.super_block, HAS_SCALES=w.scales is not None,
                 HAS_DMIN=w.dmin is not None, HAS_MINS=w.mins is not None,
                 EMULATED=os.environ.get("TRITON_INTERPRET") == "1", enable_fp_fusion=False)  # x8 rounds as `reference`
    if tile is None:
        _autotuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
    else:
        config = dict(tile)
        num_warps = config.pop("num_warps", 4)
        _gemv_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](*args, **flags, **config, num_warps=num_warps)
    return out


def quantize_dequantize_x(x: torch.Tensor) -> torch.Tensor:
    """x [..., k] rounded to int8 per 32 values as the kernel rounds it (half to even), back in float32."""
    groups = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(groups * inverse) * (amax / 127.0)).reshape(x.shape)


def reference(x: torch.Tensor, w: GroupedCodes) -> torch.Tensor:
    """What codes_gemv computes, in float32: the dequantized rows times x rounded to int8 per 32 values."""
    return quantize_dequantize_x(x) @ w.dequantize().to(x.device).T
