import torch

from chitu.ops.torch_ref.norm import rms_norm

HeadNorm = tuple[torch.Tensor, torch.Tensor, int, float]  # (weight of heads < split, of the others, split, eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                 norm: HeadNorm | None = None) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] channels of x [T, heads, head_dim]; cos/sin are [T, rotary_dim/2].
    norm (low weight, high weight, split, eps): first RMS-normalise heads < split by one weight, the rest
    by the other."""
    if norm is not None:
        low, high, split, eps = norm
        x = torch.cat((rms_norm(x[:, :split], low, eps), rms_norm(x[:, split:], high, eps)), dim=1)
    rotary_dim = 2 * cos.shape[-1]
    rot, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, passthrough), dim=-1) if passthrough.numel() else rotated
