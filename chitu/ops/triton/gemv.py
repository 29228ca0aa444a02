"""y = x W^T for a single row x: the projections of a batch-1 decode step, where cuBLAS reads the
smaller matrices well below the copy rate. Each program reduces a band of W's rows in fp32.

`norm_gemv` also applies the (residual add and) RMSNorm before the product: every program normalises
the one row itself, so the norm costs no launch of its own. `gated_gemv` likewise takes the MLP's
[gate | up] row and applies SiLU-and-mul as it reads it.

The tile of each shape comes from the table benchmarks/tune_gemv.py writes for this GPU
(gemv_configs/<GPU name>.json); shapes not in it are autotuned at their first call, a pick that the
few microseconds of these kernels make noisy."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import triton
import triton.language as tl

from chitu.ops.triton import pdl
from chitu.ops.triton.tuned_table import gpu_table

CONFIG_DIR = Path(__file__).with_name("gemv_configs")


@dataclass(frozen=True)
class GemvTile:
    block_n: int  # rows of W a program reduces
    block_k: int
    num_warps: int
    num_stages: int

    def triton_config(self) -> triton.Config:
        return triton.Config({"BLOCK_N": self.block_n, "BLOCK_K": self.block_k}, num_warps=self.num_warps,
                             num_stages=self.num_stages)


CANDIDATES = [GemvTile(*fields) for fields in [
    (8, 512, 4, 3), (8, 1024, 4, 3), (16, 512, 4, 3), (16, 256, 4, 4), (4, 1024, 4, 3), (8, 512, 8, 4),
    (32, 256, 8, 3), (16, 1024, 8, 3), (32, 512, 8, 3), (8, 2048, 8, 3),
    # few rows a program: enough programs for the small matrices of MoE models
    (4, 512, 4, 4), (2, 1024, 4, 4), (4, 2048, 8, 3), (2, 2048, 8, 3), (4, 1024, 8, 3),
    # few rows (an MoE router's 128 experts): one or two rows a program
    (1, 2048, 4, 2), (2, 1024, 4, 3), (1, 1024, 4, 3), (2, 2048, 8, 2)]]


def shape_key(n: int, k: int, has_norm: bool, weight_dtype: torch.dtype) -> str:
    return f"N={n},K={k},norm={int(has_norm)},{str(weight_dtype).removeprefix('torch.')}"


@lru_cache(maxsize=None)
def tuned_tile(device_index: int, n: int, k: int, has_norm: bool, weight_dtype: torch.dtype) -> GemvTile | None:
    fields = gpu_table(CONFIG_DIR, device_index).get(shape_key(n, k, has_norm, weight_dtype))
    return GemvTile(**fields) if fields else None


@triton.jit
def _summed_chunk(x_ptr, res_ptr, cols, col_mask, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual) at `cols`, the sum rounded to x's dtype as ops/triton/norm.py rounds it."""
    h = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(res_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)).to(h.dtype)
    return h


@triton.jit
def _normed_chunk(x_ptr, res_ptr, norm_w_ptr, normed_ptr, res_out_ptr, cols, col_mask, rstd, writes,
                  HAS_RESIDUAL: tl.constexpr):
    """The normalised x (+ residual) at `cols`, rounded as ops/triton/norm.py rounds it; the program
    that `writes` also stores the sum and the normalised row."""
    h = _summed_chunk(x_ptr, res_ptr, cols, col_mask, HAS_RESIDUAL)
    normed = (h.to(tl.float32) * rstd).to(h.dtype).to(tl.float32)
    normed = (normed * tl.load(norm_w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)).to(h.dtype)
    if writes:
        tl.store(normed_ptr + cols, normed, mask=col_mask)
        if HAS_RESIDUAL:
            tl.store(res_out_ptr + cols, h, mask=col_mask)
    return normed


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, w_stride, out_ptr, N, K, res_ptr, norm_w_ptr, normed_ptr, res_out_ptr, eps,
                 HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl.let_next_start(PDL)
    program = tl.program_id(0)
    rows = program * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * w_stride
    # the first chunk of weights is read while the kernel before this one finishes
    cols = tl.arange(0, BLOCK_K)
    w_first = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0)
    pdl.wait_for_previous(PDL)
    rstd = 1.0
    if HAS_NORM:
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            h = _summed_chunk(x_ptr, res_ptr, cols, cols < K, HAS_RESIDUAL).to(tl.float32)
            squares += h * h
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    acc = w_first.to(tl.float32) * _x_chunk(x_ptr, res_ptr, norm_w_ptr, normed_ptr, res_out_ptr, 0, K, rstd,
                                            program == 0, HAS_NORM, HAS_RESIDUAL, GATED, BLOCK_K)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _x_chunk(x_ptr, res_ptr, norm_w_ptr, normed_ptr, res_out_ptr, k0, K, rstd, program == 0, HAS_NORM,
                     HAS_RESIDUAL, GATED, BLOCK_K)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _x_chunk(x_ptr, res_ptr, norm_w_ptr, normed_ptr, res_out_ptr, k0, K, rstd, writes, HAS_NORM: tl.constexpr,
             HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr, BLOCK_K: tl.constexpr):
    """The input row's chunk at k0 in fp32: x itself, normalised (see _normed_chunk), or with GATED
    silu(x[:K]) * x[K:] rounded as ops/triton/activation.py rounds it."""
    cols = k0 + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    if HAS_NORM:
        return _normed_chunk(x_ptr, res_ptr, norm_w_ptr, normed_ptr, res_out_ptr, cols, col_mask, rstd, writes,
                             HAS_RESIDUAL).to(tl.float32)
    if GATED:
        gate = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + cols, mask=col_mask, other=0.0)
        silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
        return (silu * up.to(tl.float32)).to(up.dtype).to(tl.float32)
    return tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)


_autotuned_kernel = triton.autotune(configs=[tile.triton_config() for tile in CANDIDATES],
                                    key=["N", "K", "HAS_NORM"])(_gemv_kernel)


def _launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None, norm_args: tuple,
            tile: GemvTile | None, gated: bool = False) -> torch.Tensor:
    n, k = weight.shape
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    residual, norm_weight, normed, residual_out, eps, has_norm, has_residual = norm_args
    args = (x.contiguous(), weight, weight.stride(0), out, n, k, residual, norm_weight, normed, residual_out, eps)
    tile = tile or tuned_tile(weight.device.index or 0, n, k, has_norm, weight.dtype)
    options = pdl.launch_options(x.device)
    if tile is None:
        _autotuned_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            *args, HAS_NORM=has_norm, HAS_RESIDUAL=has_residual, GATED=gated, **options)
    else:
        _gemv_kernel[(triton.cdiv(n, tile.block_n),)](
            *args, HAS_NORM=has_norm, HAS_RESIDUAL=has_residual, GATED=gated, BLOCK_N=tile.block_n,
            BLOCK_K=tile.block_k,
            num_warps=tile.num_warps, num_stages=tile.num_stages, **options)
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
         tile: GemvTile | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T → [1, N] in x's dtype or out's (fp32 accumulation), with the given
    tile or this GPU's choice for the shape."""
    return _launch(x, weight, out, (x, x, x, x, 0.0, False, False), tile)


def gated_gemv(gate_up: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
               tile: GemvTile | None = None) -> torch.Tensor:
    """(silu(gate) * up) @ weight^T for one row gate_up [1, 2K] = [gate | up] and weight [N, K]: what
    activation.silu_and_mul and then gemv compute, in one launch."""
    assert gate_up.shape[-1] == 2 * weight.shape[1]
    return _launch(gate_up, weight, out, (gate_up, gate_up, gate_up, gate_up, 0.0, False, False), tile, gated=True)


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              weight: torch.Tensor, out: torch.Tensor | None = None, tile: GemvTile | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normed @ weight^T, normed, x + residual) for one row, where normed = rms_norm(x + residual):
    what norm.add_rms_norm (or norm.rms_norm without a residual) and then gemv compute, in one launch.
    Without a residual the third is x itself. The product is in x's dtype or out's."""
    normed = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    out = _launch(x, weight, out, (x if residual is None else residual.contiguous(), norm_weight, normed, summed,
                                    eps, True, residual is not None), tile)
    return out, normed, summed
