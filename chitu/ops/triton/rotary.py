"""Rotary position embedding on x [T, heads, head_dim]: neox (halves) or interleaved (pairs) style,
the first 2 * cos.shape[-1] channels rotated and the rest copied."""
import torch
import triton
import triton.language as tl

HEADS_PER_PROGRAM = 16


@triton.jit
def _rotary_kernel(x_ptr, x_stride_t, x_stride_h, cos_ptr, sin_ptr, cs_stride_t, out_ptr,
                   heads, head_dim, half_rot,
                   INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_PASS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = head < heads
    x_row = x_ptr + token * x_stride_t + head[:, None] * x_stride_h
    out_row = out_ptr + (token * heads + head[:, None]) * head_dim

    j = tl.arange(0, BLOCK_HALF)
    half_mask = head_mask[:, None] & (j < half_rot)[None, :]
    if INTERLEAVED:  # load the (even, odd) pairs as one contiguous run and split them in registers
        c = tl.arange(0, 2 * BLOCK_HALF)
        pair_mask = head_mask[:, None] & (c < 2 * half_rot)[None, :]
        pairs = tl.load(x_row + c[None, :], mask=pair_mask, other=0.0)
        x1, x2 = tl.split(tl.reshape(pairs, [BLOCK_H, BLOCK_HALF, 2]))
    else:
        x1 = tl.load(x_row + j[None, :], mask=half_mask, other=0.0)
        x2 = tl.load(x_row + half_rot + j[None, :], mask=half_mask, other=0.0)
    # cos/sin and each product rounded to x's dtype, exactly as the torch reference (and HF) round them
    dtype = out_ptr.dtype.element_ty
    cos = _rounded(tl.load(cos_ptr + token * cs_stride_t + j, mask=j < half_rot, other=0.0), dtype)[None, :]
    sin = _rounded(tl.load(sin_ptr + token * cs_stride_t + j, mask=j < half_rot, other=0.0), dtype)[None, :]
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    out1 = (_rounded(x1 * cos, dtype) - _rounded(x2 * sin, dtype)).to(dtype)
    out2 = (_rounded(x2 * cos, dtype) + _rounded(x1 * sin, dtype)).to(dtype)
    if INTERLEAVED:
        tl.store(out_row + c[None, :], tl.reshape(tl.join(out1, out2), [BLOCK_H, 2 * BLOCK_HALF]), mask=pair_mask)
    else:
        tl.store(out_row + j[None, :], out1, mask=half_mask)
        tl.store(out_row + half_rot + j[None, :], out2, mask=half_mask)

    if BLOCK_PASS > 0:
        p = 2 * half_rot + tl.arange(0, BLOCK_PASS)
        pass_mask = head_mask[:, None] & (p < head_dim)[None, :]
        tl.store(out_row + p[None, :], tl.load(x_row + p[None, :], mask=pass_mask), mask=pass_mask)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x rounded to `dtype`, back in fp32 (torch rounds the result of each elementwise op)."""
    return x.to(tl.float32).to(dtype).to(tl.float32)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] (rows may be strided; last dim contiguous) by cos/sin [T, rotary_dim/2]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    tokens, heads, head_dim = x.shape
    half_rot = cos.shape[-1]
    cos, sin = cos.contiguous(), sin.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_h = min(HEADS_PER_PROGRAM, triton.next_power_of_2(heads))
    pass_width = head_dim - 2 * half_rot
    _rotary_kernel[(tokens, triton.cdiv(heads, block_h))](
        x, x.stride(0), x.stride(1), cos, sin, cos.stride(0), out, heads, head_dim, half_rot,
        INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half_rot),
        BLOCK_PASS=triton.next_power_of_2(pass_width) if pass_width else 0,
        # the compiler turns each rounded product into a 16-bit multiply; fused into an FMA, a product
        # would skip its rounding and the result would differ from the reference's in the last bit
        enable_fp_fusion=False,
    )
    return out
