"""HF configs of GGUF files built from the metadata llama.cpp writes, for the MoE models and dense llama.

transformers' GGUF loader gets the MoE ones wrong or does not know them: for `qwen3moe` it drops
`moe_intermediate_size`, a `llama` file with experts (how convert_hf_to_gguf.py writes Mixtral)
becomes a dense LlamaConfig, and `glm4moe` is unknown. So for those three Chitu reads the metadata
itself (the `{arch}.*` keys of gguf.Keys, as convert_hf_to_gguf.py writes them) and the tensor list
(which layers route to experts, attention biases, q/k norms). Dense `llama` (the default model) is read
the same way, from the reader Chitu already opened: transformers would parse the whole file, its
vocabulary included, a second time (~3 s for SmolLM2). Every other architecture is left to
transformers (`config_from_metadata` returns None).
"""
from __future__ import annotations

import gguf
import numpy as np
from transformers import (DeepseekV2Config, DeepseekV3Config, Glm4MoeConfig, LlamaConfig, MixtralConfig,
                          PretrainedConfig, Qwen3MoeConfig)

from chitu.checkpoint.reader import CheckpointError

LLM, ATTENTION, ROPE = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
SOFTMAX, SIGMOID = int(gguf.ExpertGatingFuncType.SOFTMAX), int(gguf.ExpertGatingFuncType.SIGMOID)

# GGUF architecture -> what Chitu serves it as (`llama` only when it has experts)
MOE_ARCHITECTURES = {"qwen3moe": "Qwen3-MoE", "llama": "Mixtral", "glm4moe": "GLM-4.5", "deepseek2": "DeepSeek-V2/V3"}


def config_from_metadata(readers: list[gguf.GGUFReader], path: str) -> PretrainedConfig | None:
    """The config of a Qwen3-MoE, Mixtral, GLM-4.5 or dense Llama GGUF file (its parts, when split: the first
    holds the metadata); None for the architectures transformers' GGUF loader handles (qwen2, qwen3, ...). MoE
    architectures and combinations Chitu cannot serve raise CheckpointError."""
    meta = _Metadata(readers, path)
    num_experts = meta.get(LLM.EXPERT_COUNT, 0)
    if meta.arch == "qwen3moe":
        return _qwen3_moe(meta)
    if meta.arch == "glm4moe":
        return _glm4_moe(meta)
    if meta.arch == "deepseek2":
        return _deepseek2(meta)
    if meta.arch == "llama":
        return _mixtral(meta) if num_experts > 0 else _llama(meta)
    if num_experts > 0 or any(name.endswith("_exps.weight") for name in meta.tensors):
        supported = ", ".join(f"{arch} ({name})" for arch, name in MOE_ARCHITECTURES.items())
        raise CheckpointError(f"GGUF architecture {meta.arch!r} with experts is not supported ({path}); "
                              f"supported MoE architectures: {supported}")
    return None


class _Metadata:
    """The metadata and tensor list of a GGUF file; keys spelled as in gguf.Keys (`{arch}.block_count`)."""

    def __init__(self, readers: list[gguf.GGUFReader], path: str):
        self.path = path
        self.fields = readers[0].fields
        self.arch = self.fields["general.architecture"].contents()
        self.tensors = {t.name: tuple(int(d) for d in reversed(t.shape))  # HF order
                        for reader in readers for t in reader.tensors}

    def get(self, key: str, default=None):
        field = self.fields.get(key.format(arch=self.arch))
        if field is None or not field.types:
            return default
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.FLOAT32:
            value = float(str(np.float32(value)))  # the shortest decimal of the float32: 1e-06, not 9.99e-07
        return value

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise self.unsupported(f"it lacks the metadata key {key.format(arch=self.arch)!r}")
        return value

    def uniform(self, key: str, default=None):
        """A per-model value that some files store per layer (an array): all layers must agree."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise self.unsupported(f"{key.format(arch=self.arch)} differs between layers ({value})")
            value = value[0]
        return value

    def has(self, tensor: str) -> bool:
        return tensor in self.tensors

    def unsupported(self, why: str) -> CheckpointError:
        name = MOE_ARCHITECTURES.get(self.arch, self.arch)
        return CheckpointError(f"GGUF architecture {self.arch!r} ({name}) in {self.path} is not supported: {why}")

    def vocab_size(self) -> int:
        if (size := self.get(LLM.VOCAB_SIZE)) is not None:
            return size
        tokens = self.fields.get(gguf.Keys.Tokenizer.LIST)
        if tokens is not None:
            return len(tokens.data)
        if self.has("token_embd.weight"):
            return self.tensors["token_embd.weight"][0]
        raise self.unsupported("neither a vocabulary size, a token list nor token_embd.weight")


def _common(meta: _Metadata, num_layers: int) -> dict:
    """Fields every decoder config has, from the keys TextModel.set_gguf_parameters writes."""
    heads = meta.uniform(ATTENTION.HEAD_COUNT)
    if heads is None:
        raise meta.unsupported(f"it lacks the metadata key {ATTENTION.HEAD_COUNT.format(arch=meta.arch)!r}")
    hidden = meta.require(LLM.EMBEDDING_LENGTH)
    head_dim = meta.get(ATTENTION.KEY_LENGTH) or hidden // heads
    if meta.get(ATTENTION.VALUE_LENGTH, head_dim) != head_dim:
        raise meta.unsupported(f"key length {head_dim} differs from value length {meta.get(ATTENTION.VALUE_LENGTH)}")
    if meta.get(ATTENTION.Q_LORA_RANK) or meta.get(ATTENTION.KV_LORA_RANK):
        raise meta.unsupported("latent (MLA) attention")
    fields = dict(
        vocab_size=meta.vocab_size(),
        hidden_size=hidden,
        intermediate_size=meta.uniform(LLM.FEED_FORWARD_LENGTH) or _dense_rows(meta, num_layers),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=meta.uniform(ATTENTION.HEAD_COUNT_KV, heads),
        head_dim=head_dim,
        max_position_embeddings=meta.get(LLM.CONTEXT_LENGTH),
        rms_norm_eps=meta.require(ATTENTION.LAYERNORM_RMS_EPS),
        tie_word_embeddings=not meta.has("output.weight"),
        attention_bias=meta.has("blk.0.attn_q.bias"),
        bos_token_id=meta.get(gguf.Keys.Tokenizer.BOS_ID),
        eos_token_id=meta.get(gguf.Keys.Tokenizer.EOS_ID),
        pad_token_id=meta.get(gguf.Keys.Tokenizer.PAD_ID),
    )
    return {key: value for key, value in fields.items() if value is not None}


def _dense_rows(meta: _Metadata, num_layers: int) -> int | None:
    """The intermediate size of the dense MLPs, from a gate tensor [rows, hidden], where the key is missing."""
    shapes = (meta.tensors.get(f"blk.{i}.ffn_gate.weight") for i in range(num_layers))
    return next((shape[0] for shape in shapes if shape is not None), None)


def _rope_parameters(meta: _Metadata, rotary_dim: int, head_dim: int, partial: bool) -> dict:
    params = {"rope_type": "default", "rope_theta": meta.get(ROPE.FREQ_BASE, 10000.0)}
    scaling = meta.get(ROPE.SCALING_TYPE, "none")
    if scaling == "linear":
        params.update(rope_type="linear", factor=meta.require(ROPE.SCALING_FACTOR))
    elif scaling == "yarn":
        params.update(rope_type="yarn", factor=meta.require(ROPE.SCALING_FACTOR),
                      original_max_position_embeddings=meta.require(ROPE.SCALING_ORIG_CTX_LEN))
        for key, name in ((ROPE.SCALING_YARN_BETA_FAST, "beta_fast"), (ROPE.SCALING_YARN_BETA_SLOW, "beta_slow"),
                          (ROPE.SCALING_YARN_ATTN_FACTOR, "attention_factor")):
            if (value := meta.get(key)) is not None:
                params[name] = value
    elif scaling != "none":
        raise meta.unsupported(f"RoPE scaling type {scaling!r} (Chitu reads none, linear and yarn)")
    if partial:
        params["partial_rotary_factor"] = rotary_dim / head_dim
    elif rotary_dim != head_dim:
        raise meta.unsupported(f"RoPE over {rotary_dim} of the {head_dim} dimensions of a head")
    return params


def _check_gating(meta: _Metadata, expected: int, name: str) -> None:
    gating = meta.get(LLM.EXPERT_GATING_FUNC, expected)
    if gating not in (0, expected):  # 0: none written, llama.cpp then uses the architecture's own
        raise meta.unsupported(f"expert gating function {gating} ({name} expected)")


def _moe_layers(meta: _Metadata, num_layers: int) -> list[int]:
    """The layers that route to experts: those with a router (ffn_gate_inp)."""
    return [i for i in range(num_layers) if meta.has(f"blk.{i}.ffn_gate_inp.weight")]


def _expert_feed_forward_length(meta: _Metadata, num_layers: int) -> int:
    """The intermediate size of one expert: its key, or the rows of a stacked gate tensor [n_expert, rows, hidden]."""
    if (rows := meta.get(LLM.EXPERT_FEED_FORWARD_LENGTH)) is not None:
        return rows
    for i in range(num_layers):
        if (shape := meta.tensors.get(f"blk.{i}.ffn_gate_exps.weight")) is not None:
            return shape[1]
    raise meta.unsupported(f"it has neither {LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=meta.arch)!r} "
                           "nor stacked experts (ffn_gate_exps)")


def _build(meta: _Metadata, config_class: type[PretrainedConfig], fields: dict) -> PretrainedConfig:
    architecture = {Qwen3MoeConfig: "Qwen3MoeForCausalLM", MixtralConfig: "MixtralForCausalLM",
                    Glm4MoeConfig: "Glm4MoeForCausalLM", LlamaConfig: "LlamaForCausalLM",
                    DeepseekV2Config: "DeepseekV2ForCausalLM", DeepseekV3Config: "DeepseekV3ForCausalLM"}[config_class]
    try:
        return config_class(architectures=[architecture], **fields)
    except (TypeError, ValueError) as error:  # transformers validates the fields' types and values
        raise meta.unsupported(f"its metadata makes an invalid {config_class.__name__}: {error}") from error


def _has_shared_experts(meta: _Metadata) -> bool:
    return bool(meta.get(LLM.EXPERT_SHARED_COUNT, 0) or meta.get(LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0)
                or any("_shexp." in name for name in meta.tensors))


def _qwen3_moe(meta: _Metadata) -> PretrainedConfig:
    num_layers = meta.require(LLM.BLOCK_COUNT)
    _check_gating(meta, SOFTMAX, "softmax")
    if _has_shared_experts(meta):
        raise meta.unsupported("shared experts (Qwen3-MoE has none)")
    fields = _common(meta, num_layers)
    moe_layers = _moe_layers(meta, num_layers)
    fields.update(
        num_experts=meta.require(LLM.EXPERT_COUNT),
        num_experts_per_tok=meta.require(LLM.EXPERT_USED_COUNT),
        moe_intermediate_size=_expert_feed_forward_length(meta, num_layers),
        # convert_hf_to_gguf does not write it for qwen3moe and llama.cpp always renormalizes
        norm_topk_prob=meta.get(LLM.EXPERT_WEIGHTS_NORM, True),
        # GGUF has no decoder_sparse_step: the layers without a router are the dense ones
        mlp_only_layers=[i for i in range(num_layers) if i not in moe_layers],
        decoder_sparse_step=1,
        rope_parameters=_rope_parameters(meta, meta.get(ROPE.DIMENSION_COUNT) or fields["head_dim"],
                                         fields["head_dim"], partial=False),
    )
    return _build(meta, Qwen3MoeConfig, fields)


def _mixtral(meta: _Metadata) -> PretrainedConfig:
    num_layers = meta.require(LLM.BLOCK_COUNT)
    _check_gating(meta, SOFTMAX, "softmax")
    if _has_shared_experts(meta):
        raise meta.unsupported("experts with shared experts (Mixtral has none)")
    if meta.get(LLM.LEADING_DENSE_BLOCK_COUNT, 0) or _moe_layers(meta, num_layers) != list(range(num_layers)):
        raise meta.unsupported("experts in only some layers (Mixtral routes every layer)")
    if meta.has("blk.0.attn_q.bias"):
        raise meta.unsupported("experts with attention biases (Mixtral has none)")
    fields = _common(meta, num_layers)
    fields.pop("attention_bias")
    expert_rows = _expert_feed_forward_length(meta, num_layers)
    intermediate = fields.setdefault("intermediate_size", expert_rows)
    if expert_rows != intermediate:
        raise meta.unsupported(f"experts of {expert_rows} rows next to a feed-forward length of {intermediate}")
    head_dim = meta.get(ROPE.DIMENSION_COUNT) or fields["head_dim"]
    fields.update(
        head_dim=head_dim,
        num_local_experts=meta.require(LLM.EXPERT_COUNT),
        num_experts_per_tok=meta.require(LLM.EXPERT_USED_COUNT),
        sliding_window=None,
        rope_parameters=_rope_parameters(meta, head_dim, head_dim, partial=False),
    )
    return _build(meta, MixtralConfig, fields)


def _llama(meta: _Metadata) -> PretrainedConfig:
    fields = _common(meta, meta.require(LLM.BLOCK_COUNT))
    head_dim = meta.get(ROPE.DIMENSION_COUNT) or fields["head_dim"]
    fields.update(head_dim=head_dim, rope_parameters=_rope_parameters(meta, head_dim, head_dim, partial=False))
    return _build(meta, LlamaConfig, fields)


def _glm4_moe(meta: _Metadata) -> PretrainedConfig:
    # block_count counts the NextN (multi-token prediction) layers after the decoder's: Chitu builds
    # only the decoder's, and their tensors (blk.{N}.*) are never read.
    blocks = meta.require(LLM.BLOCK_COUNT)
    nextn = meta.get(LLM.NEXTN_PREDICT_LAYERS, 0)
    num_layers = blocks - nextn
    if num_layers <= 0:
        raise meta.unsupported(f"{nextn} NextN layers out of {blocks} blocks")
    _check_gating(meta, SIGMOID, "sigmoid")
    fields = _common(meta, num_layers)
    moe_layers = _moe_layers(meta, num_layers)
    dense = meta.get(LLM.LEADING_DENSE_BLOCK_COUNT)
    if dense is None:
        dense = moe_layers[0] if moe_layers else num_layers
    if moe_layers != list(range(dense, num_layers)):
        raise meta.unsupported(f"experts in layers {moe_layers}, not in every layer from {dense} on")
    moe_intermediate = _expert_feed_forward_length(meta, num_layers)
    shared = meta.get(LLM.EXPERT_SHARED_COUNT)
    if shared is None:  # older files: from the stacked shared experts' rows
        shape = meta.tensors.get(f"blk.{dense}.ffn_gate_shexp.weight")
        shared = shape[0] // moe_intermediate if shape else 0
    head_dim = fields["head_dim"]
    # Glm4MoeModel writes int(head_dim * partial_rotary_factor), the factor defaulting to 0.5
    rotary_dim = meta.get(ROPE.DIMENSION_COUNT) or head_dim // 2
    fields.update(
        n_routed_experts=meta.require(LLM.EXPERT_COUNT),
        num_experts_per_tok=meta.require(LLM.EXPERT_USED_COUNT),
        moe_intermediate_size=moe_intermediate,
        n_shared_experts=shared,
        first_k_dense_replace=dense,
        n_group=meta.get(LLM.EXPERT_GROUP_COUNT, 1),
        topk_group=meta.get(LLM.EXPERT_GROUP_USED_COUNT, 1),
        routed_scaling_factor=meta.get(LLM.EXPERT_WEIGHTS_SCALE, 1.0),
        norm_topk_prob=meta.get(LLM.EXPERT_WEIGHTS_NORM, False),  # llama.cpp's default
        use_qk_norm=meta.has("blk.0.attn_q_norm.weight"),
        num_nextn_predict_layers=nextn,
        rope_parameters=_rope_parameters(meta, rotary_dim, head_dim, partial=True),
    )
    return _build(meta, Glm4MoeConfig, fields)


def _deepseek2(meta: _Metadata) -> PretrainedConfig:
    """DeepSeek-V2/V3 (and R1): sigmoid gating makes a V3 config, softmax a V2 one. Files from converters before
    llama.cpp's MLA rework store per-head key/value lengths; later ones MQA lengths plus key/value_length_mla."""
    num_layers = meta.require(LLM.BLOCK_COUNT)
    heads = meta.uniform(ATTENTION.HEAD_COUNT)
    hidden = meta.require(LLM.EMBEDDING_LENGTH)
    rope_dim = meta.require(ROPE.DIMENSION_COUNT)
    nope = (meta.get(ATTENTION.KEY_LENGTH_MLA) or meta.require(ATTENTION.KEY_LENGTH)) - rope_dim
    gating = meta.get(LLM.EXPERT_GATING_FUNC, SOFTMAX) or SOFTMAX  # 0: none written, llama.cpp's softmax
    if gating not in (SOFTMAX, SIGMOID):
        raise meta.unsupported(f"expert gating function {gating}")
    moe_layers = _moe_layers(meta, num_layers)
    dense = meta.get(LLM.LEADING_DENSE_BLOCK_COUNT, moe_layers[0] if moe_layers else num_layers)
    if moe_layers != list(range(dense, num_layers)):
        raise meta.unsupported(f"experts in layers {moe_layers}, not in every layer from {dense} on")
    groups = meta.get(LLM.EXPERT_GROUP_COUNT, 1)
    fields = dict(
        vocab_size=meta.vocab_size(), hidden_size=hidden, intermediate_size=meta.uniform(LLM.FEED_FORWARD_LENGTH),
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=meta.get(LLM.CONTEXT_LENGTH), rms_norm_eps=meta.require(ATTENTION.LAYERNORM_RMS_EPS),
        tie_word_embeddings=not meta.has("output.weight"), attention_bias=meta.has("blk.0.attn_kv_a_mqa.bias"),
        bos_token_id=meta.get(gguf.Keys.Tokenizer.BOS_ID), eos_token_id=meta.get(gguf.Keys.Tokenizer.EOS_ID),
        pad_token_id=meta.get(gguf.Keys.Tokenizer.PAD_ID),
        q_lora_rank=meta.get(ATTENTION.Q_LORA_RANK) or None, kv_lora_rank=meta.require(ATTENTION.KV_LORA_RANK),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, head_dim=rope_dim,
        v_head_dim=meta.get(ATTENTION.VALUE_LENGTH_MLA) or meta.require(ATTENTION.VALUE_LENGTH),
        n_routed_experts=meta.require(LLM.EXPERT_COUNT), num_experts_per_tok=meta.require(LLM.EXPERT_USED_COUNT),
        moe_intermediate_size=_expert_feed_forward_length(meta, num_layers),
        n_shared_experts=meta.get(LLM.EXPERT_SHARED_COUNT, 0), first_k_dense_replace=dense,
        routed_scaling_factor=meta.get(LLM.EXPERT_WEIGHTS_SCALE, 1.0), n_group=groups,
        topk_group=meta.get(LLM.EXPERT_GROUP_USED_COUNT, 1), rope_parameters=_deepseek_rope(meta),
    )
    fields = {key: value for key, value in fields.items() if value is not None or key == "q_lora_rank"}
    if gating == SIGMOID:
        fields.update(norm_topk_prob=meta.get(LLM.EXPERT_WEIGHTS_NORM, False))
        return _build(meta, DeepseekV3Config, fields)
    fields.update(topk_method="group_limited_greedy" if groups > 1 else "greedy")
    return _build(meta, DeepseekV2Config, fields)


def _deepseek_rope(meta: _Metadata) -> dict:
    """DeepSeek's YaRN as HF spells it: the converter writes 0.1 x mscale_all_dim as the log multiplier (and
    llama.cpp takes mscale to equal it), beta_fast / beta_slow at their defaults of 32 and 1."""
    params = {"rope_type": "default", "rope_theta": meta.get(ROPE.FREQ_BASE, 10000.0)}
    scaling = meta.get(ROPE.SCALING_TYPE, "none")
    if scaling == "yarn":
        mscale = float(f"{meta.get(ROPE.SCALING_YARN_LOG_MUL, 0.1) / 0.1:.6g}")
        params.update(rope_type="yarn", factor=meta.require(ROPE.SCALING_FACTOR), mscale=mscale, mscale_all_dim=mscale,
                      original_max_position_embeddings=meta.require(ROPE.SCALING_ORIG_CTX_LEN), beta_fast=32,
                      beta_slow=1)
    elif scaling != "none":
        raise meta.unsupported(f"RoPE scaling type {scaling!r} (Chitu reads none and yarn for DeepSeek)")
    return params
