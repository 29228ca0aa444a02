"""AWQ and GPTQ int4 checkpoints (quant/awq_gptq.py, quant/int4_groups.py): tiny random models quantized and
packed as the real packers lay them out (int4_checkpoints.py), read back against a dequantization written
from the format descriptions, and run against transformers holding the dequantized weights."""
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import int4_checkpoints
import process_tree
from chitu.checkpoint import open_checkpoint
from chitu.ops import triton as triton_ops
from chitu.models.loader import load_model
from chitu.quant.config import QuantConfig, UnsupportedQuantizationError
from chitu.quant.int4_groups import Int4GroupsMethod, Int4Weight, int4_linear
from chitu.quant.linear_method import UNQUANTIZED
from int4_checkpoints import Scheme
from test_distributed import ENGINE as DIST_ENGINE
from test_distributed import SCRIPT as DIST_SCRIPT
from test_distributed import assert_same_generation, generate
from test_models import randomize, run_prefill_and_decode

# groups of 32 rows divide every projection's inputs, also each rank's half at tp_size=2
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-6)
MODELS = {
    "llama": ("hf-llama", transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True)),
    "qwen3": ("hf-llama", transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16)),
    "qwen3-moe": ("hf-qwen-3-moe", transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
        mlp_only_layers=[1])),
}
SCHEMES = {
    "awq": Scheme("awq"),
    "awq-g64": Scheme("awq", group_size=64),
    "gptq-sym": Scheme("gptq", sym=True),
    "gptq-asym-v2": Scheme("gptq", checkpoint_format="gptq_v2"),
    "gptq-act-order": Scheme("gptq", act_order=True),
    "gptq-act-order-sym-per-channel": Scheme("gptq", group_size=-1, act_order=True, sym=True),
}
needs_cuda_triton = pytest.mark.skipif(not (triton_ops.AVAILABLE and torch.cuda.is_available()),
                                       reason="the Triton int4 kernel needs triton and a CUDA device")
# float32: only the order of the sums differs from transformers; bf16: activations, and scales rounded to bf16
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def checkpoint(tmp_path: Path, model: str, scheme: Scheme) -> tuple[str, str, str]:
    """(quantized checkpoint, dequantized one, Chitu's model type)."""
    model_type, config_cls, model_cls, extra = MODELS[model]
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**{**TINY, **extra})).eval()
    randomize(hf_model)
    quantized, dense = int4_checkpoints.write(hf_model, tmp_path, scheme)
    return str(quantized), str(dense), model_type


def load(path: str, model_type: str, dtype: torch.dtype = torch.float32):
    with open_checkpoint(path) as reader:
        return load_model(reader, model_type, 256, torch.device("cpu"), dtype)


def test_the_test_packers_round_trip():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 128, generator=gen)
    for scheme in SCHEMES.values():
        q, zeros, scales, g_idx = int4_checkpoints.quantize(weight, scheme, gen)
        expected = ((q - zeros[g_idx]) * scales[g_idx].double()).T.float()
        assert torch.equal(int4_checkpoints.dequantize(int4_checkpoints.pack(q, zeros, scales, g_idx, scheme), scheme),
                           expected)
        step = scales.float().max()
        assert (expected - weight).abs().max() <= step * (1 if scheme.sym else 0.51)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("model", ["llama", "qwen3-moe"])
def test_layers_hold_the_checkpoints_weights(tmp_path, model, scheme):
    """Every projection (Q/K/V and gate/up merged, experts stacked) dequantizes to what the checkpoint says."""
    scheme = SCHEMES[scheme]
    quantized, dense, model_type = checkpoint(tmp_path, model, scheme)
    chitu = load(quantized, model_type)
    (file,) = Path(dense).glob("*.safetensors")
    expected = load_file(file)
    checked = 0
    for name, module in chitu.named_modules():
        if not isinstance(getattr(module, "method", None), Int4GroupsMethod):
            continue
        if name.endswith("experts.gate_up") or name.endswith("experts.down"):
            parent = name.rpartition(".")[0]
            projections = ["gate_proj", "up_proj"] if name.endswith("gate_up") else ["down_proj"]
            for e, weights in enumerate(module.method.stacked(module).experts):
                want = torch.cat([expected[f"{parent}.{e}.{p}.weight"] for p in projections])
                assert torch.equal(weights.dense(), want), f"{name} expert {e}"
                checked += 1
            continue
        parent, own = name.rpartition(".")[0], name.rpartition(".")[2]
        projections = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}.get(own, [own])
        want = torch.cat([expected[f"{parent}.{p}.weight"] for p in projections])
        assert torch.equal(module.method._weights(module).dense(), want), name
        checked += 1
    assert checked >= 3 * 2
    assert chitu.lm_head.weight.dtype == torch.float32  # the LM head stays unquantized


def random_weight(out_features: int, in_features: int, group: int, act_order: bool, dtype: torch.dtype,
                  device: str = "cpu") -> Int4Weight:
    gen = torch.Generator().manual_seed(1)
    groups = in_features // group
    weight = torch.zeros(in_features // 8, out_features, dtype=torch.int32)
    for j in range(8):  # eight random values per word, the sign bit included
        weight |= torch.randint(0, 16, weight.shape, generator=gen, dtype=torch.int32) << (4 * j)
    scale = (torch.rand(groups, out_features, generator=gen) * 0.1 + 0.01).to(dtype)
    zero = torch.randint(0, 17, (groups, out_features), generator=gen, dtype=torch.uint8)
    perm = torch.randperm(in_features, generator=gen).to(device) if act_order else None
    return Int4Weight(weight.to(device), scale.to(device), zero.to(device), perm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8, 300])
@pytest.mark.parametrize("shape,group,act_order", [((96, 256), 128, False), ((64, 256), 32, True),
                                                   ((40, 96), 32, False), ((48, 64), 16, False), ((32, 64), 64, True)])
def test_int4_linear_is_the_dequantized_product(dtype, rows, shape, group, act_order):
    """torch's CPU int4 kernel (a few rows, output widths of 16s, groups of 32 to 256) and the dequantized
    matmul (the rest) both give x W^T of the weight dense() dequantizes."""
    w = random_weight(*shape, group, act_order, dtype)
    x = torch.randn(rows * shape[1] + 3, dtype=dtype)[3:].view(rows, shape[1])  # not aligned to a vector
    expected = x.double() @ w.dense().double().T
    out = int4_linear(x, w)
    assert out.dtype == dtype and out.shape == (rows, shape[0])
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert ((out.double() - expected).norm() / expected.norm()).item() < tolerance
    assert torch.equal(int4_linear(x.view(1, rows, -1), w).view(rows, -1), out)


@pytest.mark.parametrize("model,scheme", [("llama", "awq"), ("llama", "gptq-act-order"), ("qwen3", "gptq-sym"),
                                          ("qwen3", "gptq-asym-v2"), ("qwen3-moe", "awq-g64"),
                                          ("qwen3-moe", "gptq-act-order"),
                                          ("llama", "gptq-act-order-sym-per-channel")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_transformers_with_the_dequantized_weights(tmp_path, model, scheme, dtype):
    """Prefill of three prompts (one in two chunks) and 8 decode steps through a paged cache, against
    transformers' float32 model whose weights are the checkpoint's dequantized ones."""
    quantized, dense, model_type = checkpoint(tmp_path, model, SCHEMES[scheme])
    chitu = load(quantized, model_type, dtype)
    hf_model = MODELS[model][2].from_pretrained(dense, dtype=torch.float32).eval()
    for step, (error,) in enumerate(run_prefill_and_decode(chitu, [hf_model])):
        assert error <= TOLERANCE[dtype], f"step {step} (0 = prefill)"


@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 200])
@pytest.mark.parametrize("shape,group,act_order", [((96, 256), 128, False), ((4096, 4096), 128, False),
                                                   ((200, 384), 64, True), ((40, 96), 32, False), ((48, 64), 64, True),
                                                   ((64, 48), 16, False), ((32, 64), 8, False)])
def test_triton_int4_gemm_is_the_dequantized_product(dtype, rows, shape, group, act_order):
    """On CUDA: the Triton kernel (groups of a multiple of 16 rows; split over K at few rows), or the
    dequantized matmul (groups of 8), against float64."""
    w = random_weight(*shape, group, act_order, dtype, "cuda")
    x = torch.randn(rows, shape[1], dtype=dtype, device="cuda")
    expected = x.double() @ w.dense().double().T
    out = int4_linear(x, w)
    assert out.dtype == dtype and out.shape == (rows, shape[0])
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert ((out.double() - expected).norm() / expected.norm()).item() < tolerance


@needs_cuda_triton
@pytest.mark.parametrize("model,scheme", [("llama", "awq"), ("qwen3", "gptq-act-order"), ("qwen3-moe", "gptq-sym")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_on_cuda_match_transformers(tmp_path, model, scheme, dtype):
    quantized, dense, model_type = checkpoint(tmp_path, model, SCHEMES[scheme])
    with open_checkpoint(quantized) as reader:
        chitu = load_model(reader, model_type, 256, torch.device("cuda"), dtype)
    hf_model = MODELS[model][2].from_pretrained(dense, dtype=torch.float32).eval().cuda()
    for step, (error,) in enumerate(run_prefill_and_decode(chitu, [hf_model], "cuda")):
        assert error <= TOLERANCE[dtype], f"step {step} (0 = prefill)"


@pytest.mark.parametrize("model,scheme", [("llama", "gptq-asym-v2"),
                                          ("qwen3-moe", "awq")])  # experts sliced over both ranks
def test_tensor_parallel_ranks_generate_what_one_process_does(tmp_path, model, scheme):
    """torchrun, two ranks over gloo: each reads its output columns (whole packed words or not: K/V heads of
    16 columns) or its input rows (whole groups) of every projection."""
    quantized, _, model_type = checkpoint(tmp_path, model, SCHEMES[scheme])
    args = [f"models.ckpt_dir={quantized}", f"models.type={model_type}"]
    assert_same_generation(generate(tmp_path, 2, args + ["infer.tp_size=2"]), generate(tmp_path, 1, args))


def test_act_order_split_over_the_inputs_is_refused(tmp_path):
    quantized, _, model_type = checkpoint(tmp_path, "llama", SCHEMES["gptq-act-order"])
    proc = process_tree.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(DIST_SCRIPT),
                             str(tmp_path / "out.json"), *DIST_ENGINE, f"models.ckpt_dir={quantized}",
                             f"models.type={model_type}", "infer.tp_size=2"], timeout=300)
    assert proc.returncode != 0
    assert "hold parts of quantization groups of 32 rows" in proc.stderr and "need tp_size=1" in proc.stderr


def config_with(quantization_config: dict, **extra) -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(**TINY, **extra, quantization_config=quantization_config)


@pytest.mark.parametrize("declared,message", [
    (dict(quant_method="awq", bits=3, group_size=128), "AWQ-quantized with bits=3; Chitu runs 4-bit"),
    (dict(quant_method="gptq", bits=8, group_size=128), "GPTQ-quantized with bits=8"),
    (dict(quant_method="awq", bits=4, group_size=128, version="gemv"), "version='gemv'; Chitu reads AWQ's GEMM"),
    (dict(quant_method="awq", bits=4, group_size=128, zero_point=False), "zero_point=false"),
    (dict(quant_method="gptq", bits=4, group_size=128, checkpoint_format="marlin"), "checkpoint_format='marlin'"),
    (dict(quant_method="gptq", bits=4, group_size=128, lm_head=True), "lm_head=True"),
    (dict(quant_method="gptq", bits=4, group_size=0), "group_size=0"),
    (dict(quant_method="compressed-tensors", format="pack-quantized"), "quant_method='compressed-tensors'"),
])
def test_unsupported_settings_are_refused_by_name(declared, message):
    with pytest.raises(UnsupportedQuantizationError, match=re.escape(message)):
        QuantConfig.from_checkpoint(config_with(declared))


def test_mla_is_refused():
    config = transformers.DeepseekV3Config(kv_lora_rank=32, quantization_config=dict(quant_method="awq", bits=4))
    with pytest.raises(UnsupportedQuantizationError, match="multi-head latent attention"):
        QuantConfig.from_checkpoint(config)


def test_groups_must_divide_each_layers_inputs(tmp_path):
    quantized, _, model_type = checkpoint(tmp_path, "llama", SCHEMES["awq"])
    config_file = Path(quantized) / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["group_size"] = 48  # 64 hidden features are not whole groups of 48
    config_file.write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError, match="64 input rows .* cannot hold whole awq groups of 48"):
        load(quantized, model_type)


def test_modules_to_not_convert_stay_unquantized():
    config = config_with(dict(quant_method="awq", bits=4, group_size=128, modules_to_not_convert=["mlp"]))
    quant = QuantConfig.from_checkpoint(config)
    assert quant.linear_method("model.layers.0.mlp.gate_up_proj") is UNQUANTIZED
    assert isinstance(quant.linear_method("model.layers.0.self_attn.qkv_proj"), Int4GroupsMethod)
