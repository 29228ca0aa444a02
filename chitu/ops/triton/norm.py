"""RMSNorm over the last dim, optionally fused with the residual add before it. Rows may be strided
(a q/k head view out of the fused qkv projection): rows are addressed as (token, head)."""
import torch
import triton
import triton.language as tl

from chitu.ops.triton import pdl

ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _rms_norm_kernel(x_ptr, x_stride_t, x_stride_h, res_ptr, res_stride_t, res_stride_h,
                     w_ptr, out_ptr, res_out_ptr, num_rows, heads, width, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, PDL: tl.constexpr):
    pdl.let_next_start(PDL)
    pdl.wait_for_previous(PDL)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    mask = (rows < num_rows)[:, None] & (cols < width)[None, :]
    token, head = (rows // heads).to(tl.int64), rows % heads
    out_offsets = rows.to(tl.int64)[:, None] * width + cols[None, :]
    x = tl.load(x_ptr + (token * x_stride_t + head * x_stride_h)[:, None] + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + (token * res_stride_t + head * res_stride_h)[:, None] + cols[None, :],
                      mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)  # rounded before normalising, as HF does
        tl.store(res_out_ptr + out_offsets, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=1) / width + eps)
    normed = (x32 * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, (normed * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _as_token_head_rows(x: torch.Tensor) -> torch.Tensor:
    """View x [..., width] as [tokens, heads, width] with a unit stride on the last dim."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.unsqueeze(1) if x.dim() == 2 else x.reshape(-1, *x.shape[-2:])


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor, residual_out: torch.Tensor | None) -> None:
    x3 = _as_token_head_rows(x)
    res3 = x3 if residual is None else _as_token_head_rows(residual)
    tokens, heads, width = x3.shape
    block_cols = triton.next_power_of_2(width)
    block_rows = max(1, ELEMENTS_PER_PROGRAM // block_cols)
    grid = (triton.cdiv(tokens * heads, block_rows),)
    _rms_norm_kernel[grid](
        x3, x3.stride(0), x3.stride(1), res3, res3.stride(0), res3.stride(1), weight, out,
        out if residual_out is None else residual_out, tokens * heads, heads, width, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        num_warps=min(16, max(4, block_cols // 512)), **pdl.launch_options(x.device),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight * normalise(x) over the last dim; x [..., width], any leading dims, rows may be strided."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _launch(x, None, weight, eps, out, None)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None,
                 residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the sum is rounded to x.dtype first."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual_out is None:
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, residual_out)
    return out, residual_out
