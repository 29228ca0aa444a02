"""W8A16 and W8A8 (quant/int8.py): int8 weights with per-channel scales, quantized as an unquantized
checkpoint loads (`quant=w8a16|simple_w8a8 quant_on_load=True`), against the dequantized weights (and, for
W8A8, the per-token quantized activations) as a reference."""
import pytest
import torch
import transformers

from chitu.checkpoint import open_checkpoint
from chitu.config import compose_config
from chitu.engine.engine import LLMEngine
from chitu.engine.sampling_params import SamplingParams
from chitu.models.loader import load_model
from chitu.quant.config import UnsupportedQuantizationError
from chitu.quant.int8 import (Int8DynamicActivationMethod, Int8WeightOnlyMethod, dequantize, int8_linear,
                             quantize_per_channel, w8a8_linear)
from test_models import FAMILIES, TINY, PagedRun, randomize, relative_error

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# per-token int8 activations, a step of absmax / 127 in every projection's input: 5e-3 seen in fp32 and bf16
W8A8_TOLERANCE = 1.5e-2
PRODUCT_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 8e-3}  # bf16: the output's rounding and the weight's


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_quantization_keeps_each_weight_within_half_a_step(scale_dtype):
    weight = torch.randn(37, 129) * torch.rand(37, 1) * 10
    q, scale = quantize_per_channel(weight, scale_dtype)
    assert q.dtype == torch.int8 and scale.dtype == scale_dtype and q.abs().max() <= 127
    error = (dequantize(q, scale) - weight).abs()
    assert (error <= scale.float()[:, None] * 0.51).all()  # half a step, and the scale's own rounding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 64])
# the CPU kernel takes multiples of 16, the Triton kernels multiples of 32; others dequantize
@pytest.mark.parametrize("in_features", [160, 144, 136, 130])
def test_int8_linear_is_the_dequantized_product(dtype, rows, in_features, device):
    q, scale = (t.to(device) for t in quantize_per_channel(torch.randn(77, in_features), dtype))
    # a contiguous view 8 values into its storage: not aligned for the kernel's vector loads
    x = torch.randn(rows * in_features + 8, dtype=dtype, device=device)[8:].view(rows, in_features)
    expected = x.double() @ dequantize(q, scale).double().T
    out = int8_linear(x, q, scale)
    assert out.dtype == dtype
    assert ((out.double() - expected).norm() / expected.norm()).item() < PRODUCT_TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("in_features", [144, 136])  # cuBLAS's int8 GEMM takes multiples of 8
def test_w8a8_linear_is_the_product_of_both_dequantized_operands(dtype, rows, in_features, device):
    q, scale = (t.to(device) for t in quantize_per_channel(torch.randn(80, in_features), dtype))
    x = torch.randn(rows, in_features, dtype=dtype, device=device) * (torch.rand(rows, 1, dtype=dtype, device=device) + 0.1) * 5
    x[0, 7] = 40.0  # an outlier sets its row's scale
    x_q = (x.double() / (x.double().abs().amax(1, keepdim=True) / 127)).round()
    x_scale = (x.float().abs().amax(1) / 127).double()
    expected = (x_q * x_scale[:, None]) @ dequantize(q, scale).double().T
    out = w8a8_linear(x, q, scale)
    assert out.dtype == dtype and out.shape == (rows, 80)
    assert ((out.double() - expected).norm() / expected.norm()).item() < PRODUCT_TOLERANCE[dtype]
    # the activations were quantized: off the unquantized product by about their step
    unquantized = x.double() @ dequantize(q, scale).double().T
    assert ((out.double() - unquantized).norm() / unquantized.norm()).item() > 1e-4


def tiny_checkpoint(tmp_path, name: str) -> tuple[str, str]:
    model_type, config_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**{**TINY, **extra})).eval()
    randomize(hf_model)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    return str(tmp_path), model_type


def dequantized_copy(quantized: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Give the unquantized model the weights the int8 one multiplies (its linear layers and LM head)."""
    dense = dict(reference.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(getattr(module, "method", None), Int8WeightOnlyMethod):
            dense[name].weight.copy_(dequantize(module.weight, module.weight_scale))
    assert not reference.lm_head.tied
    reference.lm_head.weight.copy_(dequantize(quantized.lm_head.weight_q, quantized.lm_head.weight_scale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["llama-bias", "qwen3-moe", "glm4-moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", ["w8a16", "simple_w8a8"])
def test_model_logits_match_its_dequantized_weights(tmp_path, name, dtype, quant, device):
    """Every linear layer (dense, shared and routed experts; biases kept) and the LM head quantized, the
    embedding and routers not; prefill and decode logits as a float32 model holding the dequantized weights
    gives them (W8A8: as close as its per-token activation steps allow)."""
    path, model_type = tiny_checkpoint(tmp_path, name)
    with open_checkpoint(path) as reader:
        quantized = load_model(reader, model_type, 64, torch.device(device), dtype, quantize_on_load=quant)
    with open_checkpoint(path) as reader:
        reference = load_model(reader, model_type, 64, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        dequantized_copy(quantized, reference)
    method = {"w8a16": Int8WeightOnlyMethod, "simple_w8a8": Int8DynamicActivationMethod}[quant]
    assert {type(m.method) for m in quantized.modules() if getattr(m, "method", None) is not None} == {method}
    tolerance = TOLERANCE[dtype] if quant == "w8a16" else W8A8_TOLERANCE
    runs = [PagedRun(quantized, 1, 16, device), PagedRun(reference, 1, 16)]
    token_ids = [3, 17, 99, 5, 250, 41, 8]
    for step in range(4):
        got, want = (run.step({0: token_ids}) for run in runs)
        assert relative_error(got, want) <= tolerance, f"step {step} (0 = prefill)"
        token_ids = [int(want.argmax())]


def test_quantize_on_load_refuses_what_it_cannot_do(tmp_path):
    path, model_type = tiny_checkpoint(tmp_path / "mla", "deepseek-v3")
    with open_checkpoint(path) as reader, pytest.raises(UnsupportedQuantizationError, match="multi-head latent"):
        load_model(reader, model_type, 64, torch.device("cpu"), torch.float32, quantize_on_load="w8a16")
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY))
    qwen3.config.quantization_config = dict(quant_method="awq", bits=4)
    qwen3.save_pretrained(tmp_path / "awq")
    with open_checkpoint(str(tmp_path / "awq")) as reader, pytest.raises(UnsupportedQuantizationError,
                                                                         match="already quantized"):
        load_model(reader, "hf-llama", 64, torch.device("cpu"), torch.float32, quantize_on_load="w8a16")


def test_the_engine_quantizes_as_the_config_says(tmp_path):
    """quant=w8a16 quant_on_load=True through the config and the worker's loader, as a user runs it."""
    path, model_type = tiny_checkpoint(tmp_path, "qwen3-moe")
    config = compose_config([f"models.ckpt_dir={path}", f"models.type={model_type}", "device=cpu", "dtype=bfloat16",
                             "infer.max_reqs=2", "infer.max_seq_len=64", "quant=w8a16", "quant_on_load=True"])
    engine = LLMEngine(config, load_tokenizer=False)
    model = engine.worker.runner.model
    assert any(isinstance(getattr(m, "method", None), Int8WeightOnlyMethod) for m in model.modules())
    assert {p.dtype for n, p in model.named_parameters() if n.endswith("experts.gate_up.weight")} == {torch.int8}
    assert model.lm_head.weight_q.dtype == torch.int8 and not hasattr(model.lm_head, "weight")
    request = engine.add_request([5, 9, 31, 2], SamplingParams(max_new_tokens=6, temperature=0, stop_with_eos=False))
    while engine.has_unfinished():
        engine.step()
    assert len(request.output_token_ids) == 6
