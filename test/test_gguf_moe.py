"""GGUF files of Qwen3-MoE, Mixtral and GLM-4.5 against HF transformers, on tiny random models.

Each model (test_models.FAMILIES) is saved by transformers and written as GGUF the way llama.cpp's
convert_hf_to_gguf.py writes it (`Qwen3MoeModel`, `LlamaModel` for Mixtral, `Glm4MoeModel`): its
metadata keys, experts stacked into blk.N.ffn_{gate,up,down}_exps [n_expert, rows, cols], Mixtral's
Q/K rows permuted, GLM-4.5's NextN layer after the decoder's (counted in block_count). Chitu reads
the config from the metadata and the tensors (dequantized) and must match transformers' logits
over prefill and decode; a Q8_0 variant is compared with the HF model holding the dequantized weights, and
with quant=gguf (its experts kept in their blocks) with Chitu's model of the same file dequantized at load.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from chitu.checkpoint import CheckpointError, open_checkpoint
from chitu.checkpoint import gguf_names
from chitu.checkpoint.gguf import split_parts
from chitu.models.loader import load_model
from chitu.ops.cpu import moe as cpu_moe
from chitu.ops.torch_ref import moe as moe_ref
from chitu.quant.gguf_blocks import GGUFExpertStack
from test_models import FAMILIES, TINY, PagedRun, randomize, relative_error, run_prefill_and_decode

QType = gguf.GGMLQuantizationType
GGUF_ARCH = {"hf-qwen-3-moe": gguf.MODEL_ARCH.QWEN3MOE, "hf-mixtral": gguf.MODEL_ARCH.LLAMA,
             "hf-glm-4-moe": gguf.MODEL_ARCH.GLM4_MOE, "deepseek-v3": gguf.MODEL_ARCH.DEEPSEEK2}
# one expert's tensor in the published checkpoints: (layer, expert, weight)
EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")


@dataclass(frozen=True)
class Case:
    family: str                 # a test_models.FAMILIES entry
    overrides: tuple = ()       # (field, value) over the family's config
    qtype: QType = QType.F32    # of the expert tensors whose rows are whole blocks (the rest stay F32)
    extra_keys: tuple = ()      # (key, value) written beside the converter's keys
    split_max_tensors: int = 0  # > 0: written as a split model (gguf-split's parts) of this many tensors a part
    split_kv_b: bool = False    # MLA: kv_b_proj as attn_k_b / attn_v_b, as the converter writes since its MLA rework


CASES = {
    # Every layer MoE, as in the published Qwen3-MoE models: llama.cpp's qwen3moe has no dense FFN
    # tensors, so convert_hf_to_gguf cannot write a model with mlp_only_layers.
    "qwen3-moe": Case("qwen3-moe", overrides=(("mlp_only_layers", []),)),
    # Beyond what convert_hf_to_gguf writes: dense layers (decoder_sparse_step=2) under qwen3's
    # ffn_{gate,up,down} names, and expert_weights_norm=false (it writes none for qwen3moe, where
    # llama.cpp always renormalizes).
    "qwen3-moe-sparse-step-unnormalized": Case("qwen3-moe-sparse-step-unnormalized",
                                               extra_keys=((gguf.Keys.LLM.EXPERT_WEIGHTS_NORM, False),)),
    "mixtral": Case("mixtral"),
    "mixtral-q8_0": Case("mixtral", qtype=QType.Q8_0),
    "mixtral-q8_0-split": Case("mixtral", qtype=QType.Q8_0, split_max_tensors=10),
    "glm4-moe": Case("glm4-moe"),
    "glm4-moe-q8_0": Case("glm4-moe", qtype=QType.Q8_0),
    # DeepSeek-V3 (MLA with q_lora, sigmoid grouped routing, YaRN) and V2 (no q_lora, softmax group-limited),
    # as convert_hf_to_gguf.py wrote them before llama.cpp's MLA rework (attn_kv_b kept whole)
    "deepseek-v3-q8_0": Case("deepseek-v3", qtype=QType.Q8_0),
    "deepseek-v2": Case("deepseek-v2"),
    # as it writes them since: kv_b_proj split per head into attn_k_b / attn_v_b, MQA key/value lengths
    "deepseek-v3-split-kv-b": Case("deepseek-v3", qtype=QType.Q8_0, split_kv_b=True),
}


@dataclass
class GGUFModel:
    path: str                           # the .gguf file
    hf_model: torch.nn.Module           # the reference, with the weights the file holds
    hf_config: transformers.PretrainedConfig
    model_type: str
    quantized: list[str]                # GGUF tensors stored as case.qtype


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory) -> GGUFModel:
    return convert(request.param, tmp_path_factory)


def convert(case_name: str, tmp_path_factory) -> GGUFModel:
    """CASES[case_name]'s tiny model, written to a GGUF file as convert_hf_to_gguf.py writes it."""
    case = CASES[case_name]
    model_type, config_cls, model_cls, extra = FAMILIES[case.family]
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**{**TINY, **extra, **dict(case.overrides)})).eval()
    randomize(hf_model)
    hf_dir = tmp_path_factory.mktemp(case_name)
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    hparams = json.loads((hf_dir / "config.json").read_text())
    state_dict = load_file(hf_dir / "model.safetensors")  # the published per-expert layout
    if model_type == "hf-glm-4-moe":
        state_dict.update(nextn_layer(state_dict, hparams))
    path = str(hf_dir / f"{case_name}.gguf")
    dequantized, quantized = write_gguf(path, GGUF_ARCH[model_type], hparams, state_dict, case)
    if case.split_max_tensors:  # the parts in a directory of their own; the model is named by its first part
        parts_dir = tmp_path_factory.mktemp(f"{case_name}-parts")
        for part in hf_dir.glob(f"{case_name}-*-of-*.gguf"):
            part.rename(parts_dir / part.name)
        path = str(next(parts_dir.glob("*-00001-of-*.gguf")))
    if dequantized:  # the reference holds what the file holds
        ref_dir = tmp_path_factory.mktemp(f"{case_name}-dequantized")
        (ref_dir / "config.json").write_text(json.dumps(hparams))
        published = load_file(hf_dir / "model.safetensors")  # without the NextN layer
        weights = {k: dequantized.get(k, v) for k, v in published.items()}
        save_file(weights, ref_dir / "model.safetensors", metadata={"format": "pt"})
        hf_model = model_cls.from_pretrained(ref_dir, dtype=torch.float32).eval()
    return GGUFModel(path, hf_model, hf_model.config, model_type, quantized)


# ---------------------------------------------------------------- the converter, as convert_hf_to_gguf.py does it


def write_gguf(path: str, arch: gguf.MODEL_ARCH, hparams: dict, state_dict: dict[str, torch.Tensor],
               case: Case) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Write `state_dict` (HF names) as GGUF; returns the HF tensors as the file holds them where
    quantized (dequantized), and the quantized GGUF tensors' names."""
    name = gguf.MODEL_ARCH_NAMES[arch]
    nextn = hparams.get("num_nextn_predict_layers", 0) if arch == gguf.MODEL_ARCH.GLM4_MOE else 0
    block_count = hparams["num_hidden_layers"] + nextn
    writer = gguf.GGUFWriter(path, name, split_max_tensors=case.split_max_tensors)
    writer.add_name(f"tiny {hparams['model_type']}")
    set_gguf_parameters(writer, arch, hparams, block_count, case)
    for key, value in case.extra_keys:
        writer.add_key_value(key.format(arch=name), value, gguf.GGUFValueType.get_type(value))
    set_vocab(writer, hparams)
    names = gguf.get_tensor_name_map(arch, block_count)
    dense_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, block_count)  # qwen3moe's dense layers
    dequantized, quantized = {}, []
    for hf_name, tensor, parts in gguf_tensors(arch, hparams, state_dict, case.split_kv_b):
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None and arch == gguf.MODEL_ARCH.QWEN3MOE:
            gguf_name = dense_names.get_name(base)
        assert gguf_name is not None, hf_name
        gguf_name = f"{gguf_name}.{suffix}"
        values = tensor.float().numpy()
        block = gguf.GGML_QUANT_SIZES[case.qtype][0]
        # the routed and shared experts, where a row is whole blocks (llama-quantize falls back for the others)
        if case.qtype != QType.F32 and "experts" in hf_name and values.shape[-1] % block == 0:
            data = gguf.quants.quantize(values, case.qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=case.qtype)
            quantized.append(gguf_name)
            stored = torch.from_numpy(gguf.quants.dequantize(data, case.qtype).reshape(values.shape))
            if parts is None:
                dequantized[hf_name] = stored
            for i, part in enumerate(parts or []):  # back to the HF tensors stacked into this one
                dequantized[part] = stored[i]
        else:
            writer.add_tensor(gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantized, quantized


def set_gguf_parameters(writer: gguf.GGUFWriter, arch: gguf.MODEL_ARCH, hparams: dict, block_count: int,
                        case: Case) -> None:
    """TextModel.set_gguf_parameters and the architecture's additions."""
    rope = hparams.get("rope_parameters") or {}
    writer.add_block_count(block_count)
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(1 if case.split_kv_b else hparams["num_key_value_heads"])
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    if (n_experts := hparams.get("num_local_experts", hparams.get("num_experts"))) is not None:
        writer.add_expert_count(n_experts)
    writer.add_expert_used_count(hparams["num_experts_per_tok"])
    if (n_group := hparams.get("n_group")) is not None:
        writer.add_expert_group_count(n_group)
    if (topk_group := hparams.get("topk_group")) is not None:
        writer.add_expert_group_used_count(topk_group)
    if (head_dim := hparams.get("head_dim")) is not None and arch != gguf.MODEL_ARCH.DEEPSEEK2:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if case.qtype == QType.F32 else gguf.LlamaFileType.MOSTLY_Q8_0)
    head_dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
    if arch == gguf.MODEL_ARCH.LLAMA:  # LlamaModel
        writer.add_vocab_size(hparams["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    elif arch == gguf.MODEL_ARCH.QWEN3MOE:  # Qwen2MoeModel
        writer.add_expert_feed_forward_length(hparams["moe_intermediate_size"])
    elif arch == gguf.MODEL_ARCH.GLM4_MOE:  # Glm4MoeModel
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 0.5)))
        writer.add_expert_count(hparams["n_routed_experts"])
        writer.add_expert_feed_forward_length(hparams["moe_intermediate_size"])
        writer.add_expert_shared_count(hparams["n_shared_experts"])
        writer.add_leading_dense_block_count(hparams["first_k_dense_replace"])
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        writer.add_expert_weights_scale(hparams["routed_scaling_factor"])
        writer.add_expert_weights_norm(hparams["norm_topk_prob"])
        writer.add_nextn_predict_layers(hparams["num_nextn_predict_layers"])
    elif arch == gguf.MODEL_ARCH.DEEPSEEK2:  # DeepseekV2Model: per-head K/V lengths, or MQA ones since the MLA rework
        writer.add_leading_dense_block_count(hparams["first_k_dense_replace"])
        writer.add_vocab_size(hparams["vocab_size"])
        if hparams.get("q_lora_rank") is not None:
            writer.add_q_lora_rank(hparams["q_lora_rank"])
        writer.add_kv_lora_rank(hparams["kv_lora_rank"])
        key_length, value_length = hparams["qk_nope_head_dim"] + hparams["qk_rope_head_dim"], hparams["v_head_dim"]
        if case.split_kv_b:
            writer.add_key_length(hparams["kv_lora_rank"] + hparams["qk_rope_head_dim"])
            writer.add_value_length(hparams["kv_lora_rank"])
            writer.add_key_length_mla(key_length)
            writer.add_value_length_mla(value_length)
        else:
            writer.add_key_length(key_length)
            writer.add_value_length(value_length)
        writer.add_expert_count(hparams["n_routed_experts"])
        writer.add_expert_feed_forward_length(hparams["moe_intermediate_size"])
        writer.add_expert_shared_count(hparams["n_shared_experts"])
        writer.add_expert_weights_scale(hparams["routed_scaling_factor"])
        writer.add_expert_weights_norm(hparams.get("norm_topk_prob", False))
        sigmoid = hparams["model_type"] == "deepseek_v3"
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
        writer.add_rope_dimension_count(hparams["qk_rope_head_dim"])
        if rope.get("rope_type") == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(rope["factor"])
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def set_vocab(writer: gguf.GGUFWriter, hparams: dict) -> None:
    """A stand-in BPE vocabulary of vocab_size tokens (Chitu reads only its size and special ids)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(hparams["vocab_size"])])
    writer.add_token_types([gguf.TokenType.NORMAL] * hparams["vocab_size"])
    if hparams.get("eos_token_id") is not None:
        writer.add_eos_token_id(hparams["eos_token_id"])


def gguf_tensors(arch: gguf.MODEL_ARCH, hparams: dict, state_dict: dict[str, torch.Tensor], split_kv_b: bool = False):
    """(HF name the tensor map knows, tensor, the HF experts stacked in it or None) as modify_tensors
    yields them: experts stacked per layer and weight, llama's Q/K permuted, GLM's correction bias renamed,
    with split_kv_b MLA's kv_b_proj split per head into the key half (transposed) and the value half."""
    experts: dict[tuple[str, str], dict[int, tuple[str, torch.Tensor]]] = {}
    n_heads, n_kv_heads = hparams["num_attention_heads"], hparams["num_key_value_heads"]
    for name, tensor in state_dict.items():
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute(tensor, n_heads)
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute(tensor, n_kv_heads)
        if match := EXPERT.fullmatch(name):
            layer, expert, weight = match.groups()
            experts.setdefault((layer, weight), {})[int(expert)] = (name, tensor)
            continue
        if name.endswith("e_score_correction_bias"):
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if split_kv_b and name.endswith("kv_b_proj.weight"):
            nope, v_dim = hparams["qk_nope_head_dim"], hparams["v_head_dim"]
            k_b, v_b = tensor.view(n_heads, nope + v_dim, -1).split([nope, v_dim], dim=1)
            yield name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2).contiguous(), None
            yield name.replace("kv_b_proj", "v_b_proj"), v_b.contiguous(), None
            continue
        yield name, tensor, None
    for (layer, weight), by_expert in experts.items():
        parts = [by_expert[e][0] for e in sorted(by_expert)]
        stacked = torch.stack([by_expert[e][1] for e in sorted(by_expert)])
        merged = (f"layers.{layer}.feed_forward.experts.{weight}.weight" if arch == gguf.MODEL_ARCH.LLAMA
                  else f"model.layers.{layer}.mlp.experts.{weight}.weight")
        yield merged, stacked, parts


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute: each head's rows from (half, half) to interleaved pairs."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def nextn_layer(state_dict: dict[str, torch.Tensor], hparams: dict) -> dict[str, torch.Tensor]:
    """GLM-4.5's multi-token-prediction layer (model.layers.{num_hidden_layers}): a MoE decoder layer
    with eh_proj, enorm, hnorm and shared_head.norm, random. Chitu must not build it."""
    index, moe_layer = hparams["num_hidden_layers"], hparams["first_k_dense_replace"]
    generator = torch.Generator().manual_seed(7)
    layer = {name.replace(f".layers.{moe_layer}.", f".layers.{index}."): torch.randn(t.shape, generator=generator)
             for name, t in state_dict.items() if f".layers.{moe_layer}." in name}
    hidden = hparams["hidden_size"]
    for name, shape in (("eh_proj.weight", (hidden, 2 * hidden)), ("enorm.weight", (hidden,)),
                        ("hnorm.weight", (hidden,)), ("shared_head.norm.weight", (hidden,))):
        layer[f"model.layers.{index}.{name}"] = torch.randn(shape, generator=generator)
    return layer


# ---------------------------------------------------------------- the tests

# The fields Chitu's builders read (chitu/models/moe.py), per family, and how the GGUF config must match.
SAME_FIELDS = {
    "hf-qwen-3-moe": ["num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                      "attention_bias", "head_dim"],
    "hf-mixtral": ["num_local_experts", "num_experts_per_tok", "intermediate_size"],
    "hf-glm-4-moe": ["n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
                     "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
                     "use_qk_norm", "attention_bias", "head_dim"],
    "deepseek-v3": ["q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
                    "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
                    "topk_method", "attention_bias"],
}
COMMON_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                 "eos_token_id"]


def qwen3_moe_layers(config) -> list[int]:
    """The layers Qwen3-MoE routes to experts (chitu/models/moe.py, transformers' Qwen3MoeDecoderLayer)."""
    return [i for i in range(config.num_hidden_layers)
            if i not in (config.mlp_only_layers or []) and (i + 1) % config.decoder_sparse_step == 0]


def test_config_equals_hf_config(converted):
    with open_checkpoint(converted.path) as reader:
        config, names = reader.hf_config(), reader.names()
    expected = converted.hf_config
    assert type(config) is type(expected)
    assert config.architectures == expected.architectures
    for field in COMMON_FIELDS + SAME_FIELDS[converted.model_type]:
        assert getattr(config, field, None) == getattr(expected, field, None), field
    assert config.rope_parameters == expected.rope_parameters  # theta, GLM's partial_rotary_factor
    if converted.model_type == "hf-qwen-3-moe":
        # GGUF has no decoder_sparse_step: the layers without a router are listed as mlp_only_layers
        assert qwen3_moe_layers(config) == qwen3_moe_layers(expected)
        if expected.decoder_sparse_step == 1:
            assert (config.mlp_only_layers, config.decoder_sparse_step) == (expected.mlp_only_layers, 1)
    if converted.model_type == "hf-glm-4-moe":  # the NextN layer is in the file but not in the model
        assert config.num_nextn_predict_layers == 1
        assert f"model.layers.{expected.num_hidden_layers}.self_attn.q_proj.weight" in names


def test_quantized_cases_hold_quantized_experts(converted, request):
    if CASES[request.node.callspec.params["converted"]].qtype == QType.F32:
        assert not converted.quantized
        return
    assert {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"} <= set(converted.quantized)
    tensors = [t for part in split_parts(converted.path) for t in gguf.GGUFReader(part).tensors]
    assert {t.name for t in tensors if t.tensor_type == QType.Q8_0} == set(converted.quantized)


def test_glm4_moe_post_attention_norm_is_the_ffn_norm():
    # llama.cpp's glm4moe stores HF's post_attention_layernorm (the norm before the MLP) as blk.N.post_attention_norm
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.GLM4_MOE, 1).get_name(
        "model.layers.0.post_attention_layernorm") == "blk.0.post_attention_norm"
    tensors = gguf_names.chitu_tensors("glm4moe", "blk.0.post_attention_norm.weight", 0)
    assert [t.name for t in tensors] == ["model.layers.0.post_attention_layernorm.weight"]


@pytest.mark.parametrize("gguf_blocks", [False, True], ids=["dequantized", "quant=gguf"])
def test_logits_match_transformers(converted, gguf_blocks):
    """Dequantized at load, and with quant=gguf (its F32 projections as float32 segments, Mixtral's Q/K rows
    unpermuted as stored bytes; Q8_0 experts in their blocks)."""
    model = load(converted, gguf_blocks)
    assert len(model.model.layers) == converted.hf_config.num_hidden_layers
    for step, (error,) in enumerate(run_prefill_and_decode(model, [converted.hf_model])):
        assert error <= 1e-4, f"step {step} (0 = prefill)"


def load(converted: GGUFModel, gguf_blocks: bool) -> torch.nn.Module:
    with open_checkpoint(converted.path) as reader:
        return load_model(reader, converted.model_type, 256, torch.device("cpu"), torch.float32, gguf_blocks=gguf_blocks)


def expert_stacks(model: torch.nn.Module) -> list[GGUFExpertStack | torch.Tensor]:
    return [weight.method.stacked(weight) for name, weight in model.named_modules()
            if name.endswith(("experts.gate_up", "experts.down"))]


def test_gguf_experts_keep_their_blocks_and_give_the_dequantized_models_logits(converted, monkeypatch):
    """quant=gguf against Chitu's model of the file dequantized at load, both float32: Q8_0 experts kept in their
    blocks (F32 ones dense float32), on the torch reference for the prefill (33 tokens) and in the CPU MoE kernel for
    the decode steps (three sequences): the same logits up to float32 summation order."""
    blocks, dense = load(converted, True), load(converted, False)
    kept = [stack.qtype for stack in expert_stacks(blocks) if isinstance(stack, GGUFExpertStack)]
    if converted.quantized:
        assert kept and set(kept) == {"Q8_0"}
    assert all(stack.dtype == torch.float32 for stack in expert_stacks(blocks) if isinstance(stack, torch.Tensor))
    paths = set()

    def spy(path, fused_experts):
        def run(x, gate_up, *args):
            if isinstance(gate_up, GGUFExpertStack):
                paths.add(path)
            return fused_experts(x, gate_up, *args)
        return run

    monkeypatch.setattr(cpu_moe, "fused_experts", spy("kernel", cpu_moe.fused_experts))
    monkeypatch.setattr(moe_ref, "fused_experts", spy("reference", moe_ref.fused_experts))
    runs = [PagedRun(model, 3, 48) for model in (blocks, dense)]
    gen = torch.Generator().manual_seed(2)
    new_tokens = {s: torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for s, n in enumerate((5, 17, 11))}
    for step in range(5):
        got, want = (run.step(new_tokens) for run in runs)
        assert relative_error(got, want) < 1e-5, f"step {step} (0 = prefill)"
        new_tokens = {s: [int(want[i].argmax())] for i, s in enumerate(new_tokens)}
    assert paths == ({"kernel", "reference"} if kept else set())


# ---------------------------------------------------------------- metadata-only files: RoPE scaling, what Chitu refuses


def write_metadata_only(path: Path, arch: str, keys: dict, tensors: dict[str, tuple[int, ...]]) -> str:
    """A GGUF file with `keys` ({arch} filled in) and zero tensors of the given HF-order shapes."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {"{arch}.block_count": 2, "{arch}.embedding_length": 64, "{arch}.feed_forward_length": 96,
                       "{arch}.attention.head_count": 4, "{arch}.attention.head_count_kv": 2,
                       "{arch}.attention.layer_norm_rms_epsilon": 1e-6, **keys}.items():
        key = key.format(arch=arch)
        if isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


ROUTED = {f"blk.{i}.ffn_gate_inp.weight": (4, 64) for i in range(2)}


@pytest.mark.parametrize("arch, keys, tensors, message", [
    ("llama", {"{arch}.expert_count": 4, "{arch}.expert_used_count": 2, "{arch}.expert_shared_count": 1}, ROUTED,
     "'llama' \\(Mixtral\\).*shared experts"),
    ("llama", {"{arch}.expert_count": 4, "{arch}.expert_used_count": 2}, {"blk.1.ffn_gate_inp.weight": (4, 64)},
     "'llama' \\(Mixtral\\).*only some layers"),
    ("glm4moe", {"{arch}.expert_count": 4, "{arch}.expert_used_count": 2, "{arch}.expert_gating_func": 1}, ROUTED,
     "'glm4moe' \\(GLM-4.5\\).*gating function 1"),
    ("glm4moe", {"{arch}.expert_count": 4, "{arch}.expert_used_count": 2, "{arch}.nextn_predict_layers": 2}, ROUTED,
     "'glm4moe' \\(GLM-4.5\\).*2 NextN layers out of 2 blocks"),
    ("qwen3moe", {"{arch}.expert_count": 4, "{arch}.expert_used_count": 2,
                  "{arch}.expert_shared_feed_forward_length": 40}, ROUTED, "'qwen3moe' \\(Qwen3-MoE\\).*shared experts"),
    ("qwen3moe", {"{arch}.expert_used_count": 2}, ROUTED, "'qwen3moe'.*lacks the metadata key 'qwen3moe.expert_count'"),
    ("qwen2moe", {"{arch}.expert_count": 4, "{arch}.expert_used_count": 2}, ROUTED,
     "GGUF architecture 'qwen2moe' with experts is not supported"),
], ids=["mixtral-shared", "mixtral-partial", "glm-softmax", "glm-all-nextn", "qwen3-shared", "qwen3-no-count", "qwen2moe"])
def test_unsupported_moe_files_name_the_architecture(tmp_path, arch, keys, tensors, message):
    path = write_metadata_only(tmp_path / "model.gguf", arch, keys, {"token_embd.weight": (32, 64), **tensors})
    with pytest.raises(CheckpointError, match=message) as error:
        open_checkpoint(path)
    assert path in str(error.value)


QWEN3_MOE_KEYS = {"{arch}.expert_count": 4, "{arch}.expert_used_count": 2, "{arch}.expert_feed_forward_length": 40,
                  "{arch}.rope.freq_base": 1000000.0}


@pytest.mark.parametrize("keys, rope_parameters", [
    ({}, dict(rope_type="default", rope_theta=1e6)),
    ({"{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": 2.0},
     dict(rope_type="linear", rope_theta=1e6, factor=2.0)),
    ({"{arch}.rope.scaling.type": "yarn", "{arch}.rope.scaling.factor": 4.0,
      "{arch}.rope.scaling.original_context_length": 32768},  # Qwen3's recipe for 128K contexts
     dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32768)),
], ids=["none", "linear", "yarn"])
def test_rope_scaling_from_metadata(tmp_path, keys, rope_parameters):
    path = write_metadata_only(tmp_path / "model.gguf", "qwen3moe", {**QWEN3_MOE_KEYS, **keys},
                               {"token_embd.weight": (32, 64), **ROUTED})
    with open_checkpoint(path) as reader:
        config = reader.hf_config()
    assert config.rope_parameters == rope_parameters
    assert (config.vocab_size, config.mlp_only_layers, config.tie_word_embeddings) == (32, [], True)


def test_unknown_rope_scaling_is_refused(tmp_path):
    path = write_metadata_only(tmp_path / "model.gguf", "qwen3moe",
                               {**QWEN3_MOE_KEYS, "{arch}.rope.scaling.type": "longrope"},
                               {"token_embd.weight": (32, 64), **ROUTED})
    with pytest.raises(CheckpointError, match="'qwen3moe'.*RoPE scaling type 'longrope'"):
        open_checkpoint(path)


def test_a_split_model_reads_from_its_first_part_or_its_directory(tmp_path_factory):
    """gguf-split's parts (only the first holds the metadata): named by the first part or by their directory,
    the same tensors as the whole file; a later part or a missing one is named."""
    split = convert("mixtral-q8_0-split", tmp_path_factory)
    parts = sorted(Path(split.path).parent.glob("*.gguf"))
    assert len(parts) > 2
    whole = convert("mixtral-q8_0", tmp_path_factory)
    with open_checkpoint(whole.path) as a, open_checkpoint(split.path) as b, \
            open_checkpoint(str(parts[0].parent)) as c:
        assert sorted(a.names()) == sorted(b.names()) == sorted(c.names())
        for name in a.names():
            assert torch.equal(a.read(name, torch.float32), b.read(name, torch.float32)), name
            assert a.stored_bytes(name) == c.stored_bytes(name)
    with pytest.raises(CheckpointError, match="is part 2 of a split GGUF model: name its first part"):
        open_checkpoint(str(parts[1]))
    parts[-1].rename(parts[-1].with_suffix(".moved"))
    with pytest.raises(CheckpointError, match=f"misses its part\\(s\\) {parts[-1].name}"):
        open_checkpoint(split.path)


@pytest.mark.parametrize("mla_absorb", ["absorb-without-precomp", "absorb"])
def test_split_kv_b_files_run_the_absorbed_modes_with_blocks_kept(tmp_path_factory, mla_absorb):
    """attn_k_b / attn_v_b joined into kv_b_proj and held dense where MLA splits it per head or folds it,
    while quant=gguf keeps the experts' Q8_0 blocks."""
    converted = convert("deepseek-v3-split-kv-b", tmp_path_factory)
    with open_checkpoint(converted.path) as reader:
        model = load_model(reader, converted.model_type, 256, torch.device("cpu"), torch.float32, mla_absorb,
                           gguf_blocks=True)
    assert any(isinstance(stack, GGUFExpertStack) for stack in expert_stacks(model))
    for step, (error,) in enumerate(run_prefill_and_decode(model, [converted.hf_model])):
        assert error <= 1e-4, f"step {step} (0 = prefill)"
