"""GGUF tensor names (llama.cpp's) and Chitu's, which are the usual HF names.

GGUF names one tensor per block and kind (`blk.3.attn_q.weight`); the experts of an MoE layer are
stacked in one 3-D tensor (`blk.3.ffn_gate_exps.weight`, [n_expert, rows, cols] in HF order), which
stands for Chitu's per-expert tensors `model.layers.3.mlp.experts.{e}.gate_proj.weight`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_self_attn_layernorm", "post_ffw_norm": "post_mlp_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
    # DeepSeek's latent attention (MLA)
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    # kv_b_proj split per head, as llama.cpp's converter writes it since its MLA rework (the reader joins them)
    "attn_k_b": "self_attn.kv_b_proj.k_b", "attn_v_b": "self_attn.kv_b_proj.v_b",
}
_WHOLE_NAMES = {"exp_probs_b": "mlp.gate.e_score_correction_bias"}  # a parameter, not a module's weight/bias
_STACKED_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# Per GGUF architecture: kinds that hold another module's tensor (GLM-4's ffn_up stacks gate over up;
# GLM-4.5 stores its pre-MLP norm as post_attention_norm, which is GLM-4's extra post-attention norm).
_ARCHITECTURE_BLOCK = {"glm4": {"ffn_up": "mlp.gate_up_proj"},
                       "glm4moe": {"post_attention_norm": "post_attention_layernorm"}}

_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class ChituTensor:
    name: str
    expert: int | None = None  # the index into a stacked experts tensor
    kind: str = ""             # the GGUF kind, e.g. "attn_q"


def chitu_tensors(architecture: str, gguf_name: str, num_experts: int) -> list[ChituTensor]:
    """Chitu's tensors stored in GGUF tensor `gguf_name` (none when Chitu has no use for it: rope_freqs)."""
    match = _NAME.fullmatch(gguf_name)
    if match is None:
        return []
    block, kind, suffix = match.groups()
    if block is None:
        return [ChituTensor(f"{_TOP_LEVEL[kind]}.{suffix}", kind=kind)] if kind in _TOP_LEVEL else []
    prefix = f"model.layers.{block}"
    if kind in _STACKED_EXPERTS:
        return [ChituTensor(f"{prefix}.mlp.experts.{e}.{_STACKED_EXPERTS[kind]}.{suffix}", e, kind)
                for e in range(num_experts)]
    if kind in _WHOLE_NAMES:
        return [ChituTensor(f"{prefix}.{_WHOLE_NAMES[kind]}", kind=kind)]
    module = _ARCHITECTURE_BLOCK.get(architecture, {}).get(kind) or _BLOCK.get(kind)
    return [ChituTensor(f"{prefix}.{module}.{suffix}", kind=kind)] if module else []
