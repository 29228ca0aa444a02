"""FP8 block-quantized checkpoints (`quant_method: fp8`, `weight_block_size: [128, 128]`): e4m3 weights,
each 128 x 128 block with a float32 multiplier in `weight_scale_inv` (edge blocks partial), as DeepSeek-V3/R1
and the Qwen3 -FP8 checkpoints store them. With `infer.raise_lower_bit_float_to=bfloat16` the weights are
dequantized once, as they load, into the compute dtype; layers stored unquantized (norms, routers, the
embedding) load as they are."""
from __future__ import annotations

import torch

from chitu.checkpoint import CheckpointReader, Shard
from chitu.quant.linear_method import UnquantizedLinearMethod


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [N, K] (fp8) times its block's multiplier, in float32; scale_inv is [ceil(N/bn), ceil(K/bk)]."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


class Fp8BlockDequantizedMethod(UnquantizedLinearMethod):
    def __init__(self, block: tuple[int, int]):
        self.block = block

    def read_part(self, reader: CheckpointReader, prefix: str, shard: Shard | None, target: torch.Tensor) -> torch.Tensor:
        """Only the whole blocks holding the shard are read and dequantized, then cut to it."""
        if not reader.has(f"{prefix}.weight_scale_inv"):
            return super().read_part(reader, prefix, shard, target)
        name = f"{prefix}.weight"
        weight_shard = scale_shard = None
        if shard is not None:
            size = self.block[shard.dim]
            first, end = shard.start // size, -(-(shard.start + shard.length) // size)
            scale_shard = Shard(shard.dim, first, end - first)
            stop = min(end * size, reader.shape(name)[shard.dim])  # the last block may be partial
            weight_shard = Shard(shard.dim, first * size, stop - first * size)
        weight = reader.read_raw(name, weight_shard, target.device).data
        scale_inv = reader.read_raw(f"{prefix}.weight_scale_inv", scale_shard, target.device).data
        blocks = dequantize_blocks(weight, scale_inv, self.block)
        part = blocks if shard is None else blocks.narrow(shard.dim, shard.start - weight_shard.start, shard.length)
        return part.to(target.dtype)
