"""FP8 block-quantized checkpoints (`quant_method: fp8`, `weight_block_size: [128, 128]`): e4m3 weights,
each 128 x 128 block with a float32 multiplier in `weight_scale_inv` (edge blocks partial), as DeepSeek-V3/R1
and the Qwen3 -FP8 checkpoints store them. With `infer.raise_lower_bit_float_to=bfloat16` the weights are
dequantized once, as they load, into the compute dtype; layers stored unquantized (norms, routers, the
embedding) load as they are."""
from __future__ import annotations

import torch
from torch import nn

from chitu.checkpoint import CheckpointReader, Shard
from chitu.layers.loadable import copy_into
from chitu.quant.linear_method import UnquantizedLinearMethod


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [N, K] (fp8) times its block's multiplier, in float32; scale_inv is [ceil(N/bn), ceil(K/bk)]."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


class Fp8BlockDequantizedMethod(UnquantizedLinearMethod):
    def __init__(self, block: tuple[int, int]):
        self.block = block

    def load(self, layer: nn.Module, reader: CheckpointReader, parts: list[tuple[str, Shard | None]],
             expert: int | None = None) -> None:
        target = layer.weight if expert is None else layer.weight[expert]
        rows = [self._read(reader, prefix, shard, target) for prefix, shard in parts]
        copy_into(target, rows[0] if len(rows) == 1 else torch.cat(rows, dim=0), f"{parts[0][0]}.weight")

    def _read(self, reader: CheckpointReader, prefix: str, shard: Shard | None, target: torch.Tensor) -> torch.Tensor:
        if not reader.has(f"{prefix}.weight_scale_inv"):
            return reader.read(f"{prefix}.weight", target.dtype, target.device, shard)
        weight = reader.read_raw(f"{prefix}.weight", device=target.device).data
        scale_inv = reader.read_raw(f"{prefix}.weight_scale_inv", device=target.device).data
        full = dequantize_blocks(weight, scale_inv, self.block)
        part = full if shard is None else full.narrow(shard.dim, shard.start, shard.length)
        return part.to(target.dtype)
