"""Mixture-of-experts operations: expert selection from router logits, and the routed experts' MLPs."""
from chitu.ops.torch_ref.moe import fused_experts, select_experts

__all__ = ["fused_experts", "select_experts"]
