"""quant=gguf: a GGUF file's weights kept in their blocks and multiplied there (ops/cpu/gguf.py).

A layer keeps one segment per run of checkpoint parts of one type (Q, K and V; gate and up): a file may
store the parts in different types (Q4_K_M files mix them). A part of a type the CPU kernels take (Q4_0, Q4_1,
Q8_0, Q4_K, Q5_K, Q6_K) keeps its blocks, sliced for its shard without decoding (whole rows, or whole blocks of
columns); any other part (F32, F16, ...) is dequantized at load into a dense float32 segment. The
blocks are exactly the file's, so a layer computes what the dequantized reference computes, up to
float32 summation order.

Routed experts (which GGUF stores stacked, one tensor per projection and layer) keep theirs on the CPU too, stacked
[E, rows, bytes] where each expert's rows are one segment of a type the kernels take: the CPU MoE kernel multiplies
them in place (ops/cpu/moe.py), the torch reference one expert at a time. Experts of other types, and on CUDA all
experts (the Triton MoE kernels read dense weights), are dequantized at load: float32 on the CPU, as dense segments
are, the compute dtype on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from chitu.checkpoint import CheckpointReader, Shard
from chitu.checkpoint.reader import RawTensor
from chitu.layers.loadable import copy_into
from chitu.ops import linear as linear_ops
from chitu.ops.cpu import gguf as gguf_ops
from chitu.quant.grouped_codes import GroupedCodes
from chitu.quant.linear_method import LinearMethod


@dataclass(frozen=True)
class Segment:
    """Output rows of a layer: GGUF blocks [rows, bytes] of `qtype` (on CUDA repacked as GroupedCodes), or a dense
    float32 [rows, in] (qtype None)."""
    data: torch.Tensor | GroupedCodes
    qtype: str | None

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.qtype is None:
            return F.linear(x.float(), self.data).to(x.dtype)
        if isinstance(self.data, GroupedCodes):
            return linear_ops.grouped_codes_linear(x, self.data)
        return gguf_ops.gguf_linear(x, self.data, self.qtype)

    def dense(self, in_features: int) -> torch.Tensor:
        """The rows as float32 values."""
        return self.data if self.qtype is None else gguf_ops.dequantize(self.data, self.qtype, in_features)

    def to(self, device: torch.device) -> Segment:
        """On CUDA the blocks repacked for the Triton kernels (quant/grouped_codes.py)."""
        if device.type == "cpu":
            return self
        if self.qtype is None:
            return Segment(self.data.to(device), None)
        return Segment(GroupedCodes.from_gguf(self.data, self.qtype).to(device), self.qtype)


@dataclass(frozen=True)
class GGUFExpertStack:
    """Stacked experts' blocks [E, rows, bytes] of one type, as the MoE operations take them (ops/moe.py), and each
    expert's view of them (made once: a step multiplies experts one by one on the reference)."""
    blocks: torch.Tensor
    qtype: str
    in_features: int
    experts: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, blocks: torch.Tensor, qtype: str, in_features: int) -> GGUFExpertStack:
        return cls(blocks, qtype, in_features, blocks.unbind(0))

    @property
    def cpu_kernel_operands(self) -> tuple[torch.Tensor, None, int]:
        """What the CPU MoE kernel reads (ops/cpu/moe.py)."""
        return self.blocks, None, gguf_ops.FORMATS[self.qtype]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.blocks.shape[:2], self.in_features))

    def expert_linear(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return gguf_ops.gguf_linear(x, self.experts[expert], self.qtype)


class GGUFBlocksMethod(LinearMethod):
    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype,
                       num_experts: int | None = None) -> None:
        layer.in_features, layer.out_features, layer.gguf_segments = in_features, out_features, []
        layer.gguf_device = torch.get_default_device()  # the model's: it is built under `with torch.device(...)`
        if num_experts is not None:  # the stack is made when its first expert is read (_load_expert)
            layer.num_experts, layer.weight, layer.gguf_stack = num_experts, None, None
            layer.dense_dtype = torch.float32 if layer.gguf_device.type == "cpu" else dtype

    def load(self, layer: nn.Module, reader: CheckpointReader, parts: list[tuple[str, Shard | None]],
             expert: int | None = None) -> None:
        segments = _merged([self._segment(reader, f"{prefix}.weight", shard, layer.in_features)
                            for prefix, shard in parts])
        if expert is not None:
            self._load_expert(layer, segments, expert, f"{parts[0][0]}.weight")
        else:
            layer.gguf_segments = [segment.to(layer.gguf_device) for segment in segments]

    def stacked(self, layer: nn.Module) -> GGUFExpertStack | torch.Tensor:
        """The experts' blocks, or their dense [E, out, in] weight."""
        return layer.gguf_stack if layer.gguf_stack is not None else layer.weight

    @staticmethod
    def _load_expert(layer: nn.Module, segments: list[Segment], expert: int, name: str) -> None:
        """One expert's rows into the stack: blocks when the first expert's rows are one segment of blocks (a GGUF
        file stores all experts of a projection in one type) and the model is on the CPU, else dense values."""
        if layer.weight is None:
            kept = segments[0] if len(segments) == 1 and segments[0].qtype and layer.gguf_device.type == "cpu" else None
            shape = kept.data.shape if kept else (layer.out_features, layer.in_features)
            layer.weight = torch.empty(layer.num_experts, *shape, dtype=torch.uint8 if kept else layer.dense_dtype,
                                       device=layer.gguf_device)
            layer.gguf_stack = GGUFExpertStack.of(layer.weight, kept.qtype, layer.in_features) if kept else None
        blocks = layer.gguf_stack is not None
        rows = segments[0].data if blocks else torch.cat([s.dense(layer.in_features) for s in segments])
        copy_into(layer.weight[expert], rows, name)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        outs = [segment.linear(x) for segment in layer.gguf_segments]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y if bias is None else y + bias

    @staticmethod
    def _segment(reader: CheckpointReader, name: str, shard: Shard | None, in_features: int) -> Segment:
        raw = reader.read_raw(name, shard)
        blocks = _blocks_of_shard(raw, shard)
        if raw.qtype is not None and blocks is not None and gguf_ops.takes(raw.qtype, in_features):
            return Segment(blocks.contiguous(), raw.qtype)
        return Segment(reader.read(name, torch.float32, "cpu", shard), None)


def _merged(segments: list[Segment]) -> list[Segment]:
    """Neighbouring segments of one type as one (Q, K and V of one type: one kernel call)."""
    merged = [segments[0]]
    for segment in segments[1:]:
        if segment.qtype == merged[-1].qtype:
            merged[-1] = Segment(torch.cat((merged[-1].data, segment.data)), segment.qtype)
        else:
            merged.append(segment)
    return merged


def _blocks_of_shard(raw: RawTensor, shard: Shard | None) -> torch.Tensor | None:
    """The stored rows of `shard` without decoding them: rows are whole; columns only when the shard spans
    whole blocks (else None)."""
    if shard is None:
        return raw.data
    offset = shard.start - raw.shard.start
    if shard.dim == 0:
        return raw.data[offset: offset + shard.length]
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[raw.qtype]]
    if offset % block_size or shard.length % block_size:
        return None
    return raw.data[:, offset // block_size * type_size: (offset + shard.length) // block_size * type_size]


GGUF_BLOCKS = GGUFBlocksMethod()
