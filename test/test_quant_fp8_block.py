"""FP8 block-quantized checkpoints dequantized at load (infer.raise_lower_bit_float_to=bfloat16): a tiny
model quantized here to e4m3 with 128 x 128 block multipliers (full and partial edge blocks), against
transformers running the dequantized weights."""
import json

import pytest
import safetensors.torch
import torch
import transformers

from chitu.checkpoint import Shard, open_checkpoint
from chitu.quant.config import UnsupportedQuantizationError
from chitu.quant.fp8_block import Fp8BlockDequantizedMethod, dequantize_blocks
from test_models import FAMILIES, TINY, load_tiny, randomize, run_prefill_and_decode

BLOCK = (128, 128)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 multipliers per block), each block scaled so that its largest entry is FP8_MAX."""
    rows, cols = weight.shape
    grid = (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    scale = torch.empty(grid)
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = weight[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]]
            scale[i, j] = block.abs().max().clamp(min=1e-12) / FP8_MAX
            quantized[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]] = \
                (block / scale[i, j]).to(torch.float8_e4m3fn)
    return quantized, scale


def test_dequantization_is_the_block_formula_bit_for_bit():
    weight, scale = quantize_blocks(torch.randn(300, 200))
    expected = torch.empty(300, 200)
    for i in range(300):
        for j in range(200):
            expected[i, j] = weight[i, j].float() * scale[i // 128, j // 128]
    assert torch.equal(dequantize_blocks(weight, scale, BLOCK), expected)


# Qwen3 with widths past one block (160 hidden, 288 intermediate: full and partial blocks); DeepSeek-V3's
# MLA and stacked experts
CASES = {
    "qwen3": ("hf-llama", transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        hidden_size=160, intermediate_size=288, num_attention_heads=5, num_key_value_heads=1, head_dim=32)),
    "deepseek-v3": FAMILIES["deepseek-v3"],
}


@pytest.fixture(scope="module", params=list(CASES))
def fp8_checkpoint(request, tmp_path_factory):
    """(path of the fp8 checkpoint, transformers' model loaded from its dequantized weights, model type)."""
    model_type, config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**{**TINY, **extra})).eval()
    randomize(hf_model)
    path, dequantized_path = (tmp_path_factory.mktemp(f"{kind}-{request.param}") for kind in ("fp8", "dequantized"))
    hf_model.save_pretrained(path, safe_serialization=True)
    hf_model.save_pretrained(dequantized_path, safe_serialization=True)
    (shard,) = path.glob("*.safetensors")
    tensors = safetensors.torch.load_file(shard)
    dequantized = dict(tensors)
    for name in [n for n in tensors if n.endswith("proj.weight") or n.endswith("_mqa.weight")]:
        tensors[name], tensors[f"{name}_scale_inv"] = quantize_blocks(tensors[name])
        dequantized[name] = dequantize_blocks(tensors[name], tensors[f"{name}_scale_inv"], BLOCK)
    safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    safetensors.torch.save_file(dequantized, dequantized_path / shard.name, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                         weight_block_size=list(BLOCK))
    (path / "config.json").write_text(json.dumps(config))
    return path, model_cls.from_pretrained(dequantized_path).eval(), model_type


def test_fp8_weights_dequantized_at_load_match_transformers(fp8_checkpoint):
    path, hf_model, model_type = fp8_checkpoint
    model = load_tiny(path, model_type, "cpu", torch.float32, raise_lower_bit_float_to="bfloat16")
    for step, (error,) in enumerate(run_prefill_and_decode(model, [hf_model])):
        assert error <= 1e-4, f"step {step} (0 = prefill)"


def test_fp8_weights_without_a_way_to_run_them_are_refused(fp8_checkpoint):
    path, _, model_type = fp8_checkpoint
    with pytest.raises(UnsupportedQuantizationError, match="set infer.raise_lower_bit_float_to=bfloat16"):
        load_tiny(path, model_type, "cpu", torch.float32)


@pytest.mark.parametrize("shard", [Shard(0, 100, 90), Shard(0, 256, 32), Shard(1, 30, 130), Shard(1, 128, 72)])
def test_a_shard_reads_only_its_blocks_and_equals_the_whole_cut(tmp_path, shard):
    """Tensor-parallel ranks read the blocks holding their rows or columns (unaligned, or in the partial
    last block) and get what dequantizing the whole weight and cutting it gives."""
    weight, scale = quantize_blocks(torch.randn(288, 200))
    safetensors.torch.save_file({"proj.weight": weight, "proj.weight_scale_inv": scale}, tmp_path / "m.safetensors")
    (tmp_path / "config.json").write_text("{}")
    target = torch.empty(0)
    with open_checkpoint(str(tmp_path)) as reader:
        part = Fp8BlockDequantizedMethod(BLOCK).read_part(reader, "proj", shard, target)
    whole = dequantize_blocks(weight, scale, BLOCK)
    assert torch.equal(part, whole.narrow(shard.dim, shard.start, shard.length))
