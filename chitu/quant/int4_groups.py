"""Int4 weights with a scale and a zero per group of input rows: AWQ and GPTQ checkpoints (quant/awq_gptq.py).

Each linear layer keeps, losslessly repacked from the checkpoint: `weight` int32 [in/8, out] (value j of word
r is input row 8r + j), `weight_scale` [groups, out] in the compute dtype and `weight_zero` uint8 [groups, out],
w = (q - zero) * scale. Rows are kept in group order: act-order GPTQ (`desc_act`) permutes them so that each
group's rows are consecutive, and `input_perm` [in] names the input column of each row, gathered from x
before the product. Stacked MoE experts hold the same per expert ([E, ...]).

The product: on CUDA the Triton kernel dequantizes tiles inside the GEMM (ops/triton/int4_gemm.py). On the
CPU, a few bf16 rows (and up to 4 float32 / fp16 ones) take torch's int4 kernel
(`_weight_int4pack_mm_for_cpu`, w = (q - 8) * scale + offset with offset = (8 - zero) * scale), which wants
its own, CPU-specific layout: built at the first product and kept beside the weight (so on the CPU each
weight takes a byte). Elsewhere the weight is dequantized into x's dtype for one matmul: (q - zero) is exact,
times the scale rounded once, as the kernels round it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from chitu.checkpoint import CheckpointReader, Shard
from chitu.layers.loadable import copy_into
from chitu.ops import triton as triton_ops
from chitu.quant.awq_gptq import PACK, Int4Format, UnpackedPart, pack_int4, unpack_int4
from chitu.quant.errors import UnsupportedQuantizationError
from chitu.quant.linear_method import LinearMethod

if triton_ops.AVAILABLE:
    from chitu.ops.triton import int4_gemm

CPU_KERNEL_GROUPS = (32, 64, 128, 256)
# 4096x4096 on an AVX-512 bf16 CPU: the kernel takes ~0.2 ms a bf16 row, dequantizing ~70 ms; float32 and fp16
# rows run ~30x slower in it (not vectorized), so only a few
CPU_KERNEL_MAX_ROWS = {torch.bfloat16: 256, torch.float32: 4, torch.float16: 4}


@dataclass(eq=False)
class Int4Weight:
    """One matrix's tensors (views of a layer's parameters), and the CPU kernel's copy once made."""
    weight: torch.Tensor        # int32 [in/8, out]
    scale: torch.Tensor         # [groups, out]
    zero: torch.Tensor          # uint8 [groups, out]
    perm: torch.Tensor | None   # int64 [in], the input column of each row; None: in order
    _cpu: dict = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return self.weight.shape[0] * PACK // self.scale.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[in, out] in group order, in `dtype`."""
        groups, out_features = self.scale.shape
        w = unpack_int4(self.weight, 0).view(groups, self.group_size, out_features).to(dtype)
        return w.sub_(self.zero[:, None].to(dtype)).mul_(self.scale[:, None].to(dtype)).view(-1, out_features)

    def dense(self) -> torch.Tensor:
        """The float32 [out, in] matrix in the checkpoint's input order."""
        rows = self.dequantize()
        if self.perm is None:
            return rows.T.contiguous()
        dense = torch.empty_like(rows)
        dense[self.perm] = rows
        return dense.T.contiguous()

    def cpu_operands(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed weight, [groups, out, 2] scales and offsets in `dtype`) as torch's CPU int4 kernel takes them,
        made again if the weight was written since."""
        key = (self.weight._version, self.scale._version, self.zero._version)
        cached = self._cpu.get(dtype)
        if cached is None or cached[0] != key:
            q = unpack_int4(self.weight, 0).T.to(torch.int32).contiguous()
            scale = self.scale.float()
            offset = (8 - self.zero.float()) * scale
            cached = key, (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2),
                           torch.stack([scale, offset], dim=-1).to(dtype).contiguous())
            self._cpu[dtype] = cached
        return cached[1]


def int4_linear(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x W^T in x's dtype."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    rows = x.reshape(-1, x.shape[-1])
    if triton_ops.enabled(x) and int4_gemm.block_k_for(w.group_size, rows.shape[1]):
        y = int4_gemm.int4_matmul(rows, w.weight, w.scale.to(x.dtype), w.zero)
    elif _cpu_kernel_takes(rows, w):
        packed, scale_offset = w.cpu_operands(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), packed, w.group_size, scale_offset)
    else:
        y = rows @ w.dequantize(x.dtype)
    return y.view(*x.shape[:-1], -1)


def _cpu_kernel_takes(rows: torch.Tensor, w: Int4Weight) -> bool:
    """torch's CPU kernel wants output widths of a multiple of 16 and groups of 32 to 256."""
    return (rows.device.type == "cpu" and 0 < rows.shape[0] <= CPU_KERNEL_MAX_ROWS.get(rows.dtype, 0)
            and w.weight.shape[1] % 16 == 0 and w.group_size in CPU_KERNEL_GROUPS)


@dataclass(frozen=True)
class Int4ExpertStack:
    """Stacked experts as the MoE reference takes them: `shape` [E, out, in] and each expert's product."""
    experts: tuple[Int4Weight, ...]
    shape: torch.Size
    source: torch.Tensor  # the stacked weight parameter the views are of

    def expert_linear(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.experts[expert])


class Int4GroupsMethod(LinearMethod):
    def __init__(self, fmt: Int4Format, act_order: bool):
        self.fmt = fmt
        self.act_order = act_order

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype,
                       num_experts: int | None = None) -> None:
        group = self._group_size(in_features)
        lead = () if num_experts is None else (num_experts,)
        groups = in_features // group

        def parameter(*shape, dtype):
            return nn.Parameter(torch.empty(*lead, *shape, dtype=dtype), requires_grad=False)
        layer.weight = parameter(in_features // PACK, out_features, dtype=torch.int32)
        layer.weight_scale = parameter(groups, out_features, dtype=dtype)
        layer.weight_zero = parameter(groups, out_features, dtype=torch.uint8)
        layer.input_perm = parameter(in_features, dtype=torch.int64) if self.act_order else None
        layer.in_features, layer.out_features = in_features, out_features

    def _group_size(self, in_features: int) -> int:
        """This layer's group size: all rows of this rank for group_size -1."""
        group = in_features if self.fmt.group_size == -1 else self.fmt.group_size
        if in_features % PACK or in_features % group:
            raise UnsupportedQuantizationError(
                f"a linear layer with {in_features} input rows (this rank's share) cannot hold whole "
                f"{self.fmt.name} groups of {group} rows packed {PACK} to a word: choose a tp_size (or "
                f"ep_size) that splits the layer's inputs into multiples of {group}")
        return group

    def load(self, layer: nn.Module, reader: CheckpointReader, parts: list[tuple[str, Shard | None]],
             expert: int | None = None) -> None:
        weights = self._views(layer, expert)
        group = self._group_size(layer.in_features)
        rows = [_in_group_order(self.fmt.read(reader, prefix, shard, weights.weight.device), group, prefix)
                for prefix, shard in parts]
        name = parts[0][0]
        order = rows[0][3]
        if any(not torch.equal(r[3], order) for r in rows[1:]):
            raise UnsupportedQuantizationError(f"{', '.join(p for p, _ in parts)}: merged projections whose "
                                               f"act-order g_idx differ (Chitu multiplies them as one matrix)")
        if weights.perm is None and not torch.equal(order, torch.arange(len(order), device=order.device)):
            raise UnsupportedQuantizationError(f"{name}.g_idx reorders the groups of the input rows, but the "
                                               f"quantization_config says desc_act=false")
        copy_into(weights.weight, pack_int4(torch.cat([r[0] for r in rows], dim=1), 0), f"{name}.qweight")
        copy_into(weights.zero, torch.cat([r[1] for r in rows], dim=1), f"{name}.qzeros")
        copy_into(weights.scale, torch.cat([r[2] for r in rows], dim=1), f"{name}.scales")
        if weights.perm is not None:
            copy_into(weights.perm, order, f"{name}.g_idx")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = int4_linear(x, self._weights(layer))
        return y if bias is None else y + bias

    def stacked(self, layer: nn.Module) -> Int4ExpertStack:
        stack = getattr(layer, "_int4_stack", None)
        if stack is None or stack.source is not layer.weight:
            experts = tuple(self._views(layer, e) for e in range(layer.weight.shape[0]))
            shape = torch.Size((len(experts), layer.out_features, layer.in_features))
            stack = layer._int4_stack = Int4ExpertStack(experts, shape, layer.weight)
        return stack

    def _weights(self, layer: nn.Module) -> Int4Weight:
        """The layer's tensors (made once: the CPU kernel's copy lives with them)."""
        weights = getattr(layer, "_int4_weights", None)
        if weights is None or weights.weight is not layer.weight:
            weights = layer._int4_weights = self._views(layer, None)
        return weights

    @staticmethod
    def _views(layer: nn.Module, expert: int | None) -> Int4Weight:
        tensors = (layer.weight, layer.weight_scale, layer.weight_zero, layer.input_perm)
        if expert is not None:
            tensors = tuple(t if t is None else t[expert] for t in tensors)
        return Int4Weight(*tensors)


def _in_group_order(part: UnpackedPart, group: int, name: str) -> tuple[torch.Tensor, ...]:
    """(q, zeros, scales) of the groups this part's rows hold, its rows sorted by group, and the order
    (the checkpoint row of each sorted row). Every group must be whole: `group` rows of this rank."""
    order = torch.argsort(part.groups, stable=True)
    present, counts = torch.unique_consecutive(part.groups[order], return_counts=True)
    if (counts != group).any():
        raise UnsupportedQuantizationError(
            f"{name}: this rank's {len(order)} input rows hold parts of quantization groups of {group} rows; "
            f"tensor parallelism must give each rank whole groups (act-order GPTQ, desc_act, scatters each group's "
            f"rows over the inputs: its layers split over their inputs need tp_size=1, or whole experts with "
            f"ep_size=tp_size)")
    return part.q[order], part.zeros[present], part.scales[present], order
