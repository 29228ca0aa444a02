"""FP8 block-quantized checkpoints (`quant_method: fp8`, `weight_block_size: [128, 128]`): e4m3 weights,
each 128 x 128 block with a float32 multiplier in `weight_scale_inv` (edge blocks partial), as DeepSeek-V3/R1
and the Qwen3 -FP8 checkpoints store them; norms, routers and the embedding are stored unquantized.

By default (`infer.raise_lower_bit_float_to=float8_e4m3fn`) the weights stay fp8 with their multipliers and
multiply as W8A8 (activations quantized per token and per 128 channels; ops/linear.block_fp8_linear) on
GPUs with e4m3 tensor cores (routed experts as W8A16, Fp8ExpertStack). With `bfloat16` they are dequantized
once, as they load, into the compute dtype: the way on the CPU and on older GPUs, and for weights a layer reads
as a matrix (MLA's folded projections)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chitu.checkpoint import CheckpointReader, Shard
from chitu.layers.loadable import copy_into
from chitu.ops import linear as linear_ops
from chitu.ops.torch_ref.fp8 import FP8, dequantize_blocks
from chitu.quant.errors import UnsupportedQuantizationError
from chitu.quant.linear_method import LinearMethod, UnquantizedLinearMethod


def block_shard(shard: Shard | None, block: tuple[int, int]) -> Shard | None:
    """The blocks (of the multipliers' grid) holding the rows or columns of `shard`."""
    if shard is None:
        return None
    size = block[shard.dim]
    first, end = shard.start // size, -(-(shard.start + shard.length) // size)
    return Shard(shard.dim, first, end - first)


class Fp8BlockDequantizedMethod(UnquantizedLinearMethod):
    def __init__(self, block: tuple[int, int]):
        self.block = block

    def read_part(self, reader: CheckpointReader, prefix: str, shard: Shard | None, target: torch.Tensor) -> torch.Tensor:
        """Only the whole blocks holding the shard are read and dequantized, then cut to it."""
        if not reader.has(f"{prefix}.weight_scale_inv"):
            return super().read_part(reader, prefix, shard, target)
        name = f"{prefix}.weight"
        weight_shard = scale_shard = block_shard(shard, self.block)
        if shard is not None:
            size = self.block[shard.dim]
            stop = min((scale_shard.start + scale_shard.length) * size, reader.shape(name)[shard.dim])
            weight_shard = Shard(shard.dim, scale_shard.start * size, stop - scale_shard.start * size)
        weight = reader.read_raw(name, weight_shard, target.device).data
        scale_inv = reader.read_raw(f"{prefix}.weight_scale_inv", scale_shard, target.device).data
        blocks = dequantize_blocks(weight, scale_inv, self.block)
        part = blocks if shard is None else blocks.narrow(shard.dim, shard.start - weight_shard.start, shard.length)
        return part.to(target.dtype)


@dataclass(frozen=True)
class Fp8ExpertStack:
    """Stacked fp8 experts [E, out, in] with their multipliers [E, out blocks, in blocks]. The MoE kernels on CUDA
    dequantize the codes to the activations' dtype as they read them (W8A16: a step's experts are bound by the
    bytes they read, not by the tensor cores); elsewhere each expert's dequantized rows multiply on the reference."""
    weight: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def triton_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.weight, self.scale_inv) if self.block == (128, 128) else None

    def expert_linear(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_blocks(self.weight[expert], self.scale_inv[expert], self.block).to(x.dtype))


class Fp8BlockMethod(LinearMethod):
    """The checkpoint's e4m3 weight and block multipliers, as stored, multiplied as W8A8. A layer stacking
    several matrices (merged Q/K/V, gate/up) or holding a tensor-parallel shard needs each cut on a block
    boundary, so that its multipliers stack and cut with it."""

    def __init__(self, block: tuple[int, int]):
        self.block = block

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype,
                       num_experts: int | None = None) -> None:
        lead = () if num_experts is None else (num_experts,)
        grid = (-(-out_features // self.block[0]), -(-in_features // self.block[1]))
        layer.weight = nn.Parameter(torch.empty(*lead, out_features, in_features, dtype=FP8), requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(torch.empty(*lead, *grid, dtype=torch.float32), requires_grad=False)

    def load(self, layer: nn.Module, reader: CheckpointReader, parts: list[tuple[str, Shard | None]],
             expert: int | None = None) -> None:
        weight = layer.weight if expert is None else layer.weight[expert]
        scale_inv = layer.weight_scale_inv if expert is None else layer.weight_scale_inv[expert]
        codes, scales = [], []
        for i, (prefix, shard) in enumerate(parts):
            if not reader.has(f"{prefix}.weight_scale_inv"):
                raise UnsupportedQuantizationError(
                    f"{prefix}.weight has no weight_scale_inv in this FP8 checkpoint, where its layer expects fp8 "
                    f"blocks: set infer.raise_lower_bit_float_to=bfloat16 to load it dequantized")
            self._check_aligned(prefix, shard, reader.shape(f"{prefix}.weight"), last=i == len(parts) - 1)
            codes.append(reader.read_raw(f"{prefix}.weight", shard, weight.device).data)
            scales.append(reader.read_raw(f"{prefix}.weight_scale_inv", block_shard(shard, self.block),
                                          scale_inv.device).data)
        copy_into(weight, torch.cat(codes), f"{parts[0][0]}.weight")
        copy_into(scale_inv, torch.cat(scales), f"{parts[0][0]}.weight_scale_inv")

    def _check_aligned(self, prefix: str, shard: Shard | None, shape: torch.Size, last: bool) -> None:
        """A shard starts on a block boundary and ends on one or at the matrix's end; a part stacked above
        another (not `last`) holds whole blocks of rows."""
        dim, start, length = (0, 0, shape[0]) if shard is None else (shard.dim, shard.start, shard.length)
        size = self.block[dim]
        ends_well = (start + length) % size == 0 or (start + length == shape[dim] and (last or dim == 1))
        if start % size or not ends_well:
            what = "rows" if dim == 0 else "columns"
            raise UnsupportedQuantizationError(
                f"{prefix}.weight: this rank's {what} {start}..{start + length} of {shape[dim]} do not fall on the "
                f"FP8 checkpoint's {size}-wide blocks, so its block multipliers cannot be cut with them: choose a "
                f"tp_size (or ep_size) that divides the layer in whole blocks, or set "
                f"infer.raise_lower_bit_float_to=bfloat16 to load the weights dequantized")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = linear_ops.block_fp8_linear(x, layer.weight, layer.weight_scale_inv, self.block)
        return y if bias is None else y + bias

    def stacked(self, layer: nn.Module) -> Fp8ExpertStack:
        return Fp8ExpertStack(layer.weight, layer.weight_scale_inv, self.block)

    def dense(self) -> LinearMethod:
        return Fp8BlockDequantizedMethod(self.block)
