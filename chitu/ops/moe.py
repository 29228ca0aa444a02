"""Mixture-of-experts operations: expert selection from router logits, and the routed experts' MLPs."""
import torch

from chitu.ops import triton as triton_ops
from chitu.ops.torch_ref import moe as ref
from chitu.ops.torch_ref.moe import select_experts

if triton_ops.AVAILABLE:
    from chitu.ops.triton import fused_moe as kernels

__all__ = ["capturable", "fused_experts", "select_experts"]


def _on_kernels(t: torch.Tensor) -> bool:
    # float32 stays on the reference: tl.dot would round its operands to tf32
    return triton_ops.enabled(t) and t.dtype != torch.float32


def capturable(expert_weights: torch.Tensor) -> bool:
    """Whether the experts' computation can be captured in a CUDA graph: the Triton path never waits for
    the host, the torch reference reads its expert counts there."""
    return _on_kernels(expert_weights)


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, first_expert: int) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over this rank's experts (see torch_ref.moe)."""
    if _on_kernels(x):
        return kernels.fused_experts(x, gate_up, down, weights, ids, first_expert)
    return ref.fused_experts(x, gate_up, down, weights, ids, first_expert)
