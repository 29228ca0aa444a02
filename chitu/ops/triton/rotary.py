"""Rotary position embedding on x [T, heads, head_dim]: neox (halves) or interleaved (pairs) style,
the first 2 * cos.shape[-1] channels rotated and the rest copied. Optionally each head is first
RMS-normalised (Qwen3's and GLM-4.5's q/k norms): heads below `split` by one weight, the rest by
another, so a layer's q and k heads take one launch.

`rotate_and_store_kv` takes a whole fused Q/K/V projection: the q heads rotated into the output, the k
heads rotated and the v heads copied straight into their slots of the paged cache, in the same launch."""
import torch
import triton
import triton.language as tl

from chitu.ops.torch_ref.rotary import HeadNorm
from chitu.ops.triton import pdl

HEADS_PER_PROGRAM = 16


@triton.jit
def _rotary_kernel(x_ptr, x_stride_t, x_stride_h, cos_ptr, sin_ptr, cs_stride_t, out_ptr,
                   w_low_ptr, w_high_ptr, split, eps, heads, head_dim, half_rot,
                   q_heads, kv_heads, k_cache_ptr, v_cache_ptr, slots_ptr,
                   INTERLEAVED: tl.constexpr, NORM: tl.constexpr, STORE_KV: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, PDL: tl.constexpr):
    """Heads below q_heads go to out [T, q_heads, head_dim]; with STORE_KV the next kv_heads (rotated) to
    k_cache and the last kv_heads (as they are) to v_cache, at the token's slot."""
    pdl.let_next_start(PDL)
    pdl.wait_for_previous(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = head < heads
    x_row = x_ptr + token * x_stride_t + head[:, None] * x_stride_h
    dtype = x_ptr.dtype.element_ty

    j = tl.arange(0, BLOCK_HALF)
    half_mask = head_mask[:, None] & (j < half_rot)[None, :]
    c = tl.arange(0, 2 * BLOCK_HALF)
    pair_mask = head_mask[:, None] & (c < 2 * half_rot)[None, :]
    x1, x2 = _halves(x_row, j, c, half_rot, half_mask, pair_mask, INTERLEAVED, BLOCK_H, BLOCK_HALF)
    v1, v2 = x1, x2
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    if BLOCK_PASS > 0:  # the channels past the rotated ones
        p = 2 * half_rot + tl.arange(0, BLOCK_PASS)
        pass_mask = head_mask[:, None] & (p < head_dim)[None, :]
        v_pass = tl.load(x_row + p[None, :], mask=pass_mask, other=0.0)
        x_pass = v_pass.to(tl.float32)
    else:  # placeholders _store_heads does not read
        p, pass_mask, v_pass, x_pass = j, half_mask, v1, x1
    if NORM:
        squares = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        if BLOCK_PASS > 0:
            squares += tl.sum(x_pass * x_pass, axis=1)
        rstd = tl.rsqrt(squares / head_dim + eps)[:, None]
        low = (head < split)[:, None]
        w1, w2 = _halves(w_low_ptr, j, c, half_rot, half_mask, pair_mask, INTERLEAVED, BLOCK_H, BLOCK_HALF)
        u1, u2 = _halves(w_high_ptr, j, c, half_rot, half_mask, pair_mask, INTERLEAVED, BLOCK_H, BLOCK_HALF)
        x1, x2 = _normed(x1, rstd, tl.where(low, w1, u1), dtype), _normed(x2, rstd, tl.where(low, w2, u2), dtype)
        if BLOCK_PASS > 0:
            w_pass = tl.where(low, tl.load(w_low_ptr + p[None, :], mask=pass_mask, other=0.0),
                              tl.load(w_high_ptr + p[None, :], mask=pass_mask, other=0.0))
            x_pass = _normed(x_pass, rstd, w_pass, dtype)
    # cos/sin and each product rounded to x's dtype, exactly as the torch reference (and HF) round them
    cos = _rounded(tl.load(cos_ptr + token * cs_stride_t + j, mask=j < half_rot, other=0.0), dtype)[None, :]
    sin = _rounded(tl.load(sin_ptr + token * cs_stride_t + j, mask=j < half_rot, other=0.0), dtype)[None, :]
    out1 = (_rounded(x1 * cos, dtype) - _rounded(x2 * sin, dtype)).to(dtype)
    out2 = (_rounded(x2 * cos, dtype) + _rounded(x1 * sin, dtype)).to(dtype)
    if BLOCK_PASS > 0:
        x_pass = x_pass.to(dtype)

    is_q = (head < q_heads)[:, None]
    _store_heads(out_ptr + (token * q_heads + head[:, None]) * head_dim, out1, out2, x_pass, j, c, p, half_rot,
                 is_q, half_mask, pair_mask, pass_mask, INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    if STORE_KV:
        slot = tl.load(slots_ptr + token).to(tl.int64)
        is_k = (head >= q_heads)[:, None] & (head < q_heads + kv_heads)[:, None]
        k_head = tl.where(is_k, head[:, None] - q_heads, 0)
        _store_heads(k_cache_ptr + (slot * kv_heads + k_head) * head_dim, out1, out2, x_pass, j, c, p, half_rot,
                     is_k, half_mask, pair_mask, pass_mask, INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
        is_v = (head >= q_heads + kv_heads)[:, None]
        v_head = tl.where(is_v, head[:, None] - q_heads - kv_heads, 0)
        _store_heads(v_cache_ptr + (slot * kv_heads + v_head) * head_dim, v1, v2, v_pass, j, c, p, half_rot,
                     is_v, half_mask, pair_mask, pass_mask, INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS)


@triton.jit
def _store_heads(row_ptr, out1, out2, out_pass, j, c, p, half_rot, heads_mask, half_mask, pair_mask, pass_mask,
                 INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_PASS: tl.constexpr):
    """The rows [BLOCK_H, 1] of `heads_mask`: the two halves (or pairs) and the channels passed through."""
    dtype = row_ptr.dtype.element_ty
    if INTERLEAVED:
        pairs = tl.reshape(tl.join(out1, out2), [BLOCK_H, 2 * BLOCK_HALF])
        tl.store(row_ptr + c[None, :], pairs.to(dtype), mask=heads_mask & pair_mask)
    else:
        tl.store(row_ptr + j[None, :], out1.to(dtype), mask=heads_mask & half_mask)
        tl.store(row_ptr + half_rot + j[None, :], out2.to(dtype), mask=heads_mask & half_mask)
    if BLOCK_PASS > 0:
        tl.store(row_ptr + p[None, :], out_pass.to(dtype), mask=heads_mask & pass_mask)


@triton.jit
def _halves(row_ptr, j, c, half_rot, half_mask, pair_mask, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_HALF: tl.constexpr):
    """The two rotated halves of BLOCK_H rows (row_ptr [BLOCK_H, 1]; a vector broadcast to every row
    when row_ptr is a scalar)."""
    if INTERLEAVED:  # load the (even, odd) pairs as one contiguous run and split them in registers
        pairs = tl.load(row_ptr + c[None, :], mask=pair_mask, other=0.0)
        return tl.split(tl.reshape(pairs, [BLOCK_H, BLOCK_HALF, 2]))
    return (tl.load(row_ptr + j[None, :], mask=half_mask, other=0.0),
            tl.load(row_ptr + half_rot + j[None, :], mask=half_mask, other=0.0))


@triton.jit
def _normed(x, rstd, weight, dtype: tl.constexpr):
    """weight * normalise(x), rounded as the torch RMSNorm rounds it: the normalised x, then the product."""
    return _rounded(_rounded(x * rstd, dtype) * weight.to(tl.float32), dtype)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x rounded to `dtype`, back in fp32 (torch rounds the result of each elementwise op)."""
    return x.to(tl.float32).to(dtype).to(tl.float32)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                 out: torch.Tensor | None = None,
                 norm: HeadNorm | None = None) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] (rows may be strided; last dim contiguous) by cos/sin [T, rotary_dim/2].
    norm (low weight, high weight, split, eps): RMS-normalise each head first, heads < split by the low
    weight [head_dim] and the others by the high one."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, cos, sin, interleaved, norm, out, x.shape[1], 0, (x, x, x))
    return out


def rotate_and_store_kv(qkv: torch.Tensor, q_heads: int, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                        norm: HeadNorm | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [T, q_heads + 2 kv_heads, head_dim] (q, k then v heads; rows may be strided): returns the rotated
    q heads [T, q_heads, head_dim]; the k heads, rotated, and the v heads go into their slots of the
    contiguous caches [num_blocks, block_size, kv_heads, head_dim]. norm as apply_rotary's, split at q_heads."""
    tokens, heads, head_dim = qkv.shape
    kv_heads = (heads - q_heads) // 2
    assert qkv.stride(-1) == 1 and q_heads + 2 * kv_heads == heads
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[-2:] == (kv_heads, head_dim)
    if out is None:
        out = torch.empty(tokens, q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens:
        _launch(qkv, cos, sin, interleaved, norm, out, q_heads, kv_heads, (k_cache, v_cache, slot_mapping))
    return out


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, norm: HeadNorm | None,
            out: torch.Tensor, q_heads: int, kv_heads: int, kv_args: tuple) -> None:
    tokens, heads, head_dim = x.shape
    half_rot = cos.shape[-1]
    if 2 * half_rot > head_dim:
        raise ValueError(f"a rotary table of {2 * half_rot} values per position for heads of {head_dim}")
    cos, sin = cos.contiguous(), sin.contiguous()
    w_low, w_high, split, eps = norm if norm is not None else (x, x, 0, 0.0)
    block_h = min(HEADS_PER_PROGRAM, triton.next_power_of_2(heads))
    pass_width = head_dim - 2 * half_rot
    _rotary_kernel[(tokens, triton.cdiv(heads, block_h))](
        x, x.stride(0), x.stride(1), cos, sin, cos.stride(0), out, w_low, w_high, split, eps,
        heads, head_dim, half_rot, q_heads, kv_heads, *kv_args, INTERLEAVED=interleaved, NORM=norm is not None,
        STORE_KV=kv_heads > 0, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half_rot),
        BLOCK_PASS=triton.next_power_of_2(pass_width) if pass_width else 0,
        # the compiler turns each rounded product into a 16-bit multiply; fused into an FMA, a product
        # would skip its rounding and the result would differ from the reference's in the last bit
        enable_fp_fusion=False, **pdl.launch_options(x.device),
    )
