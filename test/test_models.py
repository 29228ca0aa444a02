"""Every model family against HF transformers on a tiny random config: prefill of a batch of prompts of
different lengths (one prompt in two chunks, reading its cached prefix pages) and 8 decode steps through
a paged cache whose block tables are scattered."""
import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from chitu.checkpoint import open_checkpoint
from chitu.layers.kv_cache_spec import kv_cache_layers
from chitu.models.loader import load_model
from chitu.models.registry import UnsupportedModelError
from chitu.quant.config import UnsupportedQuantizationError
from chitu.runner.cuda_graph import capturable
from chitu.ops.attention_metadata import AttentionMetadata
from chitu.runner.model_runner import ModelRunner

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-6)

FAMILIES = {
    "llama": ("hf-llama", transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3-rope-scaling-tied": ("hf-llama", transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=True, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=64))),
    "llama-bias": ("hf-llama", transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "qwen2": ("hf-llama", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": ("hf-llama", transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32)),
    "glm4": ("hf-glm-z1", transformers.Glm4Config, transformers.Glm4ForCausalLM, dict(attention_bias=True, head_dim=16, pad_token_id=0, eos_token_id=1)),
    "mistral": ("hf-llama", transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
    # MoE: routers with large random weights (and random correction biases) so that routing is far from a tie
    "qwen3-moe": ("hf-qwen-3-moe", transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        head_dim=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=40, norm_topk_prob=True,
        mlp_only_layers=[1])),
    "qwen3-moe-sparse-step-unnormalized": ("hf-qwen-3-moe", transformers.Qwen3MoeConfig,
                                           transformers.Qwen3MoeForCausalLM, dict(
        head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=False,
        decoder_sparse_step=2)),
    "mixtral": ("hf-mixtral", transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        num_local_experts=5, num_experts_per_tok=2, sliding_window=None)),
    "glm4-moe": ("hf-glm-4-moe", transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM, dict(
        head_dim=16, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=40, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5, pad_token_id=0, eos_token_id=1)),
    # MLA: latent 32 + RoPE key 8, nope 16, v 12; DeepSeek's YaRN with its attention-scale correction
    "deepseek-v3": ("deepseek-v3", transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=40, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                             mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1))),
    "deepseek-v3-no-q-lora": ("deepseek-v3", transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=40, n_shared_experts=2,
        first_k_dense_replace=2, n_group=1, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False,
        attention_bias=True)),
    # DeepSeek-V2: softmax routing within the groups holding the best scores, no q_lora (V2-Lite)
    "deepseek-v2": ("deepseek-v3", transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=40, n_shared_experts=2,
        first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                        original_max_position_embeddings=64, mscale=0.707,
                                                        mscale_all_dim=0.707, beta_fast=32, beta_slow=1))),
}
PROMPT_LENS = [5, 17, 11]
DECODE_STEPS = 8
BLOCK_SIZE = 4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model_type, config_cls, model_cls, extra = FAMILIES[request.param]
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**{**TINY, **extra})).eval()
    randomize(hf_model)
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path, safe_serialization=True)
    return Family(hf_model, load_tiny(path, model_type, "cpu", torch.float32), path, model_type)


@dataclass
class Family:
    hf_model: torch.nn.Module
    model: torch.nn.Module  # Chitu's, float32 on the CPU
    path: Path              # the checkpoint save_pretrained wrote
    model_type: str


def load_tiny(path, model_type: str, device: str, dtype: torch.dtype, mla_absorb: str = "none",
              raise_lower_bit_float_to: str = "float8_e4m3fn"):
    with open_checkpoint(str(path)) as reader:
        return load_model(reader, model_type, 256, torch.device(device), dtype, mla_absorb, raise_lower_bit_float_to)


def randomize(hf_model: torch.nn.Module) -> None:
    """Random biases and norms, so that every weight is exercised; MoE routers far from ties; MLA's
    attention far from uniform, so that its softmax scale (YaRN's correction) shows."""
    mla = hf_model.config.model_type in ("deepseek_v2", "deepseek_v3")
    for name, p in hf_model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=1.0 if mla and "a_layernorm" in name else 0.2)
        elif name.endswith("mlp.gate.weight"):
            torch.nn.init.normal_(p, std=1.0)
        elif mla and "self_attn" in name and "o_proj" not in name:
            torch.nn.init.normal_(p, std=0.3)
    for name, b in hf_model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            torch.nn.init.normal_(b, std=0.3)


class PagedRun:
    """Drives a Chitu model through prefill and decode steps over a paged cache with scattered blocks."""

    def __init__(self, model, num_seqs: int, tokens_per_seq: int, device: str = "cpu"):
        self.device = device
        self.runner = ModelRunner(model, torch.device(device), BLOCK_SIZE)
        for layer in kv_cache_layers(model):
            layer.backend = "triton" if device == "cuda" else "ref"
        blocks_per_seq = -(-tokens_per_seq // BLOCK_SIZE)
        ids = list(range(num_seqs * blocks_per_seq + 3))
        random.Random(0).shuffle(ids)
        self.runner.allocate_kv_cache(len(ids))
        self.tables = [ids[i * blocks_per_seq:(i + 1) * blocks_per_seq] for i in range(num_seqs)]
        self.cached = [0] * num_seqs

    @torch.inference_mode()
    def step(self, new_tokens: dict[int, list[int]]) -> torch.Tensor:
        """Feed new tokens to some sequences; float32 logits of each one's last new token, on the CPU."""
        seqs = list(new_tokens)
        for s in seqs:
            self.cached[s] += len(new_tokens[s])
        meta = AttentionMetadata.build([len(new_tokens[s]) for s in seqs], [self.cached[s] for s in seqs],
                                       [self.tables[s] for s in seqs], BLOCK_SIZE, self.device)
        flat = torch.tensor([t for s in seqs for t in new_tokens[s]], device=self.device)
        hidden = self.runner.model(flat, meta)
        return self.runner.model.compute_logits(hidden[meta.query_start_loc[1:] - 1]).float().cpu()


@torch.inference_mode()
def hf_last_logits(hf_model, sequences: list[list[int]]) -> torch.Tensor:
    device = next(hf_model.parameters()).device
    return torch.stack([hf_model(torch.tensor([s], device=device)).logits[0, -1].float().cpu() for s in sequences])


def run_prefill_and_decode(model, hf_models, device: str = "cpu") -> list[tuple[float, ...]]:
    """Relative errors of Chitu's logits against each HF model, then of each further HF model against
    the first, for every prefill and decode step; tokens follow the first HF model's greedy choices."""
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in PROMPT_LENS]
    run = PagedRun(model, len(sequences), max(PROMPT_LENS) + DECODE_STEPS, device)
    split = 9  # prompt 1 is prefilled in two chunks; the second attends over its cached prefix pages
    first_logits = run.step({0: sequences[0], 1: sequences[1][:split], 2: sequences[2]})
    second_logits = run.step({1: sequences[1][split:]})
    logits = torch.stack([first_logits[0], second_logits[0], first_logits[2]])
    errors = []
    for step in range(DECODE_STEPS + 1):
        expected = [hf_last_logits(hf, sequences) for hf in hf_models]
        errors.append(tuple(relative_error(logits, e) for e in expected)
                      + tuple(relative_error(e, expected[0]) for e in expected[1:]))
        if step < DECODE_STEPS:
            for seq, token in zip(sequences, expected[0].argmax(-1).tolist()):
                seq.append(token)
            logits = run.step({i: [seq[-1]] for i, seq in enumerate(sequences)})
    return errors


def test_logits_match_transformers(family):
    for step, (error,) in enumerate(run_prefill_and_decode(family.model, [family.hf_model])):
        assert error <= 1e-4, f"step {step} (0 = prefill)"


@pytest.mark.parametrize("mla_absorb", ["absorb-without-precomp", "absorb"])
@pytest.mark.parametrize("family", ["deepseek-v3", "deepseek-v3-no-q-lora", "deepseek-v2"], indirect=True)
def test_mla_absorbed_into_a_latent_cache_matches_transformers(family, mla_absorb):
    """One latent + RoPE-key entry per token in the cache; `absorb` also folds kv_b_proj into the q and o
    projections at load, so none is left."""
    model = load_tiny(family.path, family.model_type, "cpu", torch.float32, mla_absorb)
    (spec,) = {layer.kv_cache_spec() for layer in kv_cache_layers(model)}
    assert spec.page_shapes(BLOCK_SIZE) == {"kv_lora_k_pe": (BLOCK_SIZE, 32 + 8)}
    folded = not any(name.endswith("kv_b_proj.weight") for name, _ in model.named_parameters())
    assert folded == (mla_absorb == "absorb")
    for step, (error,) in enumerate(run_prefill_and_decode(model, [family.hf_model])):
        assert error <= 1e-4, f"step {step} (0 = prefill)"


def test_mla_rotates_its_rope_part_whatever_head_dim_the_config_carries():
    """A DeepSeek config whose head_dim (64) is not its qk_rope_head_dim (32): RoPE turns the 32 rope
    values of each head (a table of 16 frequencies), as the published configs (head_dim = qk_rope_head_dim) do."""
    from chitu.models.registry import build_model
    config = transformers.DeepseekV3Config(**{**TINY, "num_key_value_heads": 4}, head_dim=64, q_lora_rank=24,
                                           kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=32, v_head_dim=12,
                                           n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           architectures=["DeepseekV3ForCausalLM"])
    model = build_model(config, "deepseek-v3", 64, torch.float32, "none")
    assert model.model.rotary.cos.shape == (64, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_cuda_is_as_close_to_fp32_transformers_as_transformers_bf16(family):
    assert_as_close_as_transformers_bf16(load_tiny(family.path, family.model_type, "cuda", torch.bfloat16),
                                         family.hf_model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mla_absorb", ["absorb-without-precomp", "absorb"])
@pytest.mark.parametrize("family", ["deepseek-v3", "deepseek-v2"], indirect=True)
def test_mla_latent_cache_on_cuda_in_bf16(family, mla_absorb):
    """The latent cache's Triton kernels (prefill with a cached prefix, decode) in bf16."""
    assert_as_close_as_transformers_bf16(
        load_tiny(family.path, family.model_type, "cuda", torch.bfloat16, mla_absorb), family.hf_model)


def assert_as_close_as_transformers_bf16(chitu_bf16, hf_model) -> None:
    hf_fp32 = copy.deepcopy(hf_model).to("cuda")
    hf_bf16 = copy.deepcopy(hf_model).to("cuda", torch.bfloat16)
    for step, (chitu_error, _, hf_error) in enumerate(run_prefill_and_decode(chitu_bf16, [hf_fp32, hf_bf16], "cuda")):
        assert chitu_error <= max(2 * hf_error, 2e-2), f"step {step}: chitu {chitu_error:.4f}, hf bf16 {hf_error:.4f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_sequence_on_cuda_matches_transformers(family):
    """A lone sequence decodes one row a step: there every norm folds into the GEMV after it (the
    attention's qkv, the router or the MLP's gate/up), fp32 against transformers."""
    model = load_tiny(family.path, family.model_type, "cuda", torch.float32)
    hf_model = copy.deepcopy(family.hf_model).to("cuda")
    sequence = torch.randint(0, TINY["vocab_size"], (PROMPT_LENS[1],), generator=torch.Generator().manual_seed(2)).tolist()
    run = PagedRun(model, 1, len(sequence) + DECODE_STEPS, "cuda")
    logits = run.step({0: sequence})
    for step in range(DECODE_STEPS + 1):
        expected = hf_last_logits(hf_model, [sequence])
        assert relative_error(logits, expected) <= 1e-4, f"step {step} (0 = prefill)"
        if step < DECODE_STEPS:
            sequence.append(int(expected[0].argmax()))
            logits = run.step({0: sequence[-1:]})


def test_unsupported_architecture_and_type_mismatch_are_clear(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    reader = open_checkpoint(str(tmp_path / "gpt2"))
    with pytest.raises(UnsupportedModelError, match="unsupported model architecture.*GPT2LMHeadModel"):
        load_model(reader, "hf-llama", 64, torch.device("cpu"), torch.float32)
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY))
    qwen3.save_pretrained(tmp_path / "qwen3")
    reader = open_checkpoint(str(tmp_path / "qwen3"))
    with pytest.raises(UnsupportedModelError, match="models.type=hf-glm-z1 but the checkpoint is Qwen3ForCausalLM"):
        load_model(reader, "hf-glm-z1", 64, torch.device("cpu"), torch.float32)


# The tensor names of the published checkpoints (Qwen3-30B-A3B, Mixtral-8x7B-Instruct-v0.1, GLM-4.5):
# experts one by one, the router as `gate`, GLM's shared experts and correction bias.
PUBLISHED_NAMES = {
    "qwen3-moe": ["model.layers.0.mlp.experts.7.gate_proj.weight", "model.layers.0.mlp.experts.0.down_proj.weight",
                  "model.layers.0.mlp.gate.weight", "model.layers.1.mlp.up_proj.weight"],
    "mixtral": ["model.layers.0.block_sparse_moe.experts.4.w1.weight", "model.layers.2.block_sparse_moe.experts.0.w2.weight",
                "model.layers.1.block_sparse_moe.experts.3.w3.weight", "model.layers.0.block_sparse_moe.gate.weight"],
    "glm4-moe": ["model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                 "model.layers.2.mlp.shared_experts.gate_proj.weight", "model.layers.0.mlp.gate_proj.weight"],
}


@pytest.mark.parametrize("family", list(PUBLISHED_NAMES), indirect=True)
def test_moe_checkpoints_are_tested_in_the_published_per_expert_layout(family, request):
    with open_checkpoint(str(family.path)) as reader:
        assert set(PUBLISHED_NAMES[request.node.callspec.params["family"]]) <= set(reader.names())
        assert not [n for n in reader.names() if "gate_up_proj" in n]  # not transformers' in-memory fusion


def test_moe_models_leave_cuda_graphs_off_until_their_experts_can_be_captured(family):
    assert capturable(family.model) == (family.model_type in ("hf-llama", "hf-glm-z1"))


@pytest.mark.parametrize("quantization_config, message", [
    (dict(quant_method="fp8", fmt="e4m3", weight_block_size=[128, 128]),
     "FP8 block-quantized \\(fmt=e4m3, weight_block_size=\\[128, 128\\]\\); its fp8 weights run as W8A8 on GPUs "
     "of compute capability 8.9 or later, not on the CPU"),
    (dict(quant_method="fp8", fmt="e4m3"), "quant_method='fp8' \\(fmt=e4m3\\)"),
    (dict(quant_method="awq", bits=3), "AWQ-quantized with bits=3; Chitu runs 4-bit"),
    (dict(quant_method="compressed-tensors"), "quant_method='compressed-tensors'"),
])
def test_quantized_checkpoint_without_a_method_is_refused_by_name(tmp_path, quantization_config, message):
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY))
    qwen3.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    with open_checkpoint(str(tmp_path)) as reader, pytest.raises(UnsupportedQuantizationError, match=message):
        load_model(reader, "hf-llama", 64, torch.device("cpu"), torch.float32)
