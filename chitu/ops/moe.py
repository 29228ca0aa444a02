"""Mixture-of-experts operations: expert selection from router logits, and the routed experts' MLPs."""
import torch

from chitu.ops import triton as triton_ops
from chitu.ops.cpu import moe as cpu_kernels
from chitu.ops.torch_ref import moe as ref

if triton_ops.AVAILABLE:
    from chitu.ops.triton import fused_moe as kernels
    from chitu.ops.triton import moe_routing

__all__ = ["capturable", "fused_experts", "select_experts"]


def _kernel_operands(stacked) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weights [E, out, in], e4m3 block multipliers or None) of stacked experts the Triton kernels read, or None:
    a dense stack, or quantized experts offering `triton_operands` (quant/fp8_block.py), on CUDA."""
    operands = (stacked, None) if isinstance(stacked, torch.Tensor) else getattr(stacked, "triton_operands", None)
    return operands if operands is not None and triton_ops.enabled(operands[0]) else None


def capturable(stacked) -> bool:
    """Whether the experts' computation can be captured in a CUDA graph: the Triton path never waits for the
    host, the torch reference reads its expert counts there."""
    return _kernel_operands(stacked) is not None


def select_experts(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool,
                   correction_bias: torch.Tensor | None, num_groups: int, top_groups: int,
                   scaling_factor: float, group_by_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] float32, expert ids [T, top_k] int64) from float32 router logits (see torch_ref.moe)."""
    if triton_ops.enabled(router_logits) and router_logits.stride(1) == 1:
        return moe_routing.select_experts(router_logits, top_k, scoring, renormalize, correction_bias, num_groups,
                                          top_groups, scaling_factor, group_by_max)
    return ref.select_experts(router_logits, top_k, scoring, renormalize, correction_bias, num_groups, top_groups,
                              scaling_factor, group_by_max)


def fused_experts(x: torch.Tensor, gate_up, down, weights: torch.Tensor,
                  ids: torch.Tensor, first_expert: int) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over this rank's experts (see torch_ref.moe). Quantized
    experts on CUDA other than fp8 blocks run on the reference, each expert's rows through its own kernels."""
    gate_up_operands, down_operands = _kernel_operands(gate_up), _kernel_operands(down)
    if gate_up_operands and down_operands:
        (gate_up, gate_up_scale), (down, down_scale) = gate_up_operands, down_operands
        return kernels.fused_experts(x, gate_up, down, weights, ids, first_expert, gate_up_scale=gate_up_scale,
                                     down_scale=down_scale)
    if cpu_kernels.takes(x, gate_up, down):
        return cpu_kernels.fused_experts(x, gate_up, down, weights, ids, first_expert)
    return ref.fused_experts(x, gate_up, down, weights, ids, first_expert)
