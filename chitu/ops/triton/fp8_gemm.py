"""W8A8 FP8 with block scales on the tensor cores (sm89+): activations quantized per token and per 128
channels by one kernel, then one GEMM whose every 128-deep step multiplies e4m3 tiles and adds the product
in float32 times the two scales, so the low-precision accumulation never spans more than one block (as
DeepGEMM promotes its sums). The weight's scales are per block of 128 x 128 (the checkpoint's own)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from chitu.ops.torch_ref.fp8 import FP8, FP8_MAX, MIN_AMAX
from chitu.ops.triton import pdl


@triton.jit
def _quantize_groups_kernel(x_ptr, codes_ptr, scale_ptr, K, stride_xm, stride_cm, stride_sm, GROUP: tl.constexpr,
                            CODE_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr, PDL: tl.constexpr):
    pdl.let_next_start(PDL)
    pdl.wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    # `/` on float32 rounds as IEEE division does, as torch's: the codes equal the reference's bit for bit
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), AMAX_FLOOR) / CODE_MAX
    codes = tl.clamp(x / scale, -CODE_MAX, CODE_MAX)
    tl.store(codes_ptr + row * stride_cm + cols, codes.to(codes_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row * stride_sm + group, scale)


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As chitu.ops.torch_ref.fp8.quantize_groups, for x [M, K] on CUDA (bit for bit)."""
    rows, width = x.shape
    groups = triton.cdiv(width, group)
    codes = torch.empty(rows, width, dtype=FP8, device=x.device)
    scale = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_groups_kernel[(rows, groups)](x, codes, scale, width, x.stride(0), codes.stride(0), scale.stride(0),
                                                GROUP=group, CODE_MAX=FP8_MAX, AMAX_FLOOR=MIN_AMAX,
                                                num_warps=1 if group <= 128 else 4,
                                                **pdl.launch_options(x.device))
    return codes, scale


@triton.jit
def _block_fp8_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, M, N, K,
                           stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                           BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """c[m, n] = sum over k-blocks kb of (a[m, kb] . b[n, kb]) * a_scale[m, kb] * b_scale[n // BLOCK_ROWS, kb]."""
    pdl.let_next_start(PDL)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    a_scale_ptrs = a_scale_ptr + offs_m.to(tl.int64) * stride_asm
    b_scale_ptrs = b_scale_ptr + (offs_n // BLOCK_ROWS).to(tl.int64) * stride_bsn
    pdl.wait_for_previous(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_scale = tl.load(a_scale_ptrs + kb, mask=m_mask, other=0.0)
        b_scale = tl.load(b_scale_ptrs + kb, mask=n_mask, other=0.0)
        acc += tl.dot(a, b) * a_scale[:, None] * b_scale[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :], c,
             mask=m_mask[:, None] & n_mask[None, :])


def _tile(rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): few rows (decode) stream the weight through narrow
    tiles, enough of them to fill the GPU; many rows take square tiles."""
    if rows <= 16:
        return 16, 64, 4, 5
    if rows <= 64:
        return 64, 64, 4, 4
    return 128, 128, 8, 3


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                     block: tuple[int, int]) -> torch.Tensor:
    """As chitu.ops.torch_ref.fp8.block_fp8_linear, for x [..., K] bf16/fp16 on CUDA and fp8 weight [N, K]."""
    assert block[1] == 128 and weight.stride(1) == 1 and scale_inv.stride(1) == 1
    rows = x.reshape(-1, x.shape[-1])
    codes, scale = quantize_groups(rows if rows.stride(1) == 1 else rows.contiguous(), block[1])
    m, (n, k) = rows.shape[0], weight.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, warps, stages = _tile(m)
    if m:
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _block_fp8_gemm_kernel[grid](codes, scale, weight, scale_inv, out, m, n, k, codes.stride(0), scale.stride(0),
                                     weight.stride(0), scale_inv.stride(0), out.stride(0), BLOCK_ROWS=block[0],
                                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block[1], num_warps=warps,
                                     num_stages=stages, **pdl.launch_options(x.device))
    return out.view(*x.shape[:-1], n)
