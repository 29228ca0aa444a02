"""Gated SiLU of the MLP: silu(gate) * up, with x = [gate | up] along the last dim."""
import torch
import triton
import triton.language as tl

from chitu.ops.triton import pdl

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, x_stride, out_ptr, width, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.let_next_start(PDL)
    pdl.wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + width + cols, mask=mask, other=0.0)
    # silu rounded to x's dtype before the product, as the torch reference's two ops do
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (silu * up.to(tl.float32)).to(up.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[..., :n]) * x[..., n:] for x [..., 2n] (rows may be strided) → [..., n]."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    width = x.shape[-1] // 2
    if out is None:
        out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(width, BLOCK))](x2, x2.stride(0), out, width, BLOCK=BLOCK,
                                                                  **pdl.launch_options(x.device))
    return out
