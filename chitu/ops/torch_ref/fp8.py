"""FP8 (e4m3) block-scaled products, as DeepSeek-V3 defines them: weights in 128 x 128 blocks, each with a
float32 multiplier; activations quantized as they come, per token and per 128 consecutive channels."""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_AMAX = 1e-10  # a group of zeros keeps a usable scale


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes [M, K], float32 scales [M, ceil(K / group)]) with x ≈ codes * scale, each group of
    `group` channels of a row scaled so its largest magnitude becomes FP8_MAX."""
    rows, width = x.shape
    groups = -(-width // group)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group - width)).view(rows, groups, group)
    scale = padded.abs().amax(dim=-1).clamp_min(MIN_AMAX) / FP8_MAX
    codes = (padded / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes.view(rows, -1)[:, :width], scale


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [N, K] (fp8) times its block's multiplier, in float32; scale_inv is [ceil(N/bn), ceil(K/bk)]."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                     block: tuple[int, int]) -> torch.Tensor:
    """x W^T in x's dtype for x [..., K]: x quantized per token and per block[1] channels, both operands
    dequantized, one float32 product (the GEMM's result up to the order of its sums)."""
    rows = x.reshape(-1, x.shape[-1])
    codes, scale = quantize_groups(rows, block[1])
    x_deq = codes.float() * scale.repeat_interleave(block[1], 1)[:, : rows.shape[1]]
    y = x_deq @ dequantize_blocks(weight, scale_inv, block).T
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
