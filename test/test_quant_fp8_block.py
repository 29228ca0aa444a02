"""FP8 block-quantized checkpoints dequantized at load (infer.raise_lower_bit_float_to=bfloat16): a tiny
model quantized here to e4m3 with 128 x 128 block multipliers (full and partial edge blocks), against
transformers running the dequantized weights."""
import json

import pytest
import safetensors.torch
import torch
import transformers

from chitu.checkpoint import Shard, open_checkpoint
from chitu.distributed.sharding import Span
from chitu.layers.linear import ColumnParallelLinear, RowParallelLinear
from chitu.ops.torch_ref.fp8 import block_fp8_linear, dequantize_blocks, quantize_groups
from chitu.quant.config import UnsupportedQuantizationError
from chitu.quant.fp8_block import Fp8BlockDequantizedMethod, Fp8BlockMethod
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


def write_fp8_checkpoint(hf_model: torch.nn.Module, path, dequantized_path) -> None:
    """The model's projections quantized to e4m3 blocks at `path` (config declaring them), and the weights that
    dequantizing them gives at `dequantized_path`."""
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


def tiny_fp8_checkpoint(case: tuple, path, dequantized_path) -> tuple[torch.nn.Module, str]:
    """A tiny random model of `case` (model type, config class, model class, config fields) written as an fp8
    checkpoint at `path`: (transformers' model loaded from its dequantized weights, the model type)."""
    model_type, config_cls, model_cls, extra = case
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**{**TINY, **extra})).eval()
    randomize(hf_model)
    write_fp8_checkpoint(hf_model, path, dequantized_path)
    return model_cls.from_pretrained(dequantized_path).eval(), model_type


@pytest.fixture(scope="module", params=list(CASES))
def fp8_checkpoint(request, tmp_path_factory):
    """(path of the fp8 checkpoint, transformers' model loaded from its dequantized weights, model type)."""
    path, dequantized_path = (tmp_path_factory.mktemp(f"{kind}-{request.param}") for kind in ("fp8", "dequantized"))
    return path, *tiny_fp8_checkpoint(CASES[request.param], path, dequantized_path)


def test_fp8_weights_dequantized_at_load_match_transformers(fp8_checkpoint):
    path, hf_model, model_type = fp8_checkpoint
    model = load_tiny(path, model_type, "cpu", torch.float32, raise_lower_bit_float_to="bfloat16")
    for step, (error,) in enumerate(run_prefill_and_decode(model, [hf_model])):
        assert error <= 1e-4, f"step {step} (0 = prefill)"


def test_fp8_weights_kept_on_the_cpu_are_refused(fp8_checkpoint):
    """The default keeps fp8 weights for the e4m3 tensor cores; the CPU has none."""
    path, _, model_type = fp8_checkpoint
    with pytest.raises(UnsupportedQuantizationError, match="not on the CPU: set infer.raise_lower_bit_float_to=bfloat16"):
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


# ---- fp8 weights kept as stored (W8A8)

@pytest.fixture
def fp8_matrices(tmp_path):
    """A checkpoint of q/k/v-like matrices (256, 128 and 200 rows of 300 columns: partial edge blocks) and their
    dequantized weights."""
    rows = {"q_proj": 256, "k_proj": 128, "v_proj": 200}
    tensors, dense = {}, {}
    for name, n in rows.items():
        weight, scale = quantize_blocks(torch.randn(n, 300))
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = weight, scale
        dense[name] = dequantize_blocks(weight, scale, BLOCK)
    safetensors.torch.save_file(tensors, tmp_path / "m.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with open_checkpoint(str(tmp_path)) as reader:
        yield reader, dense


def test_kept_fp8_layers_hold_the_stored_blocks_of_their_shards(fp8_matrices):
    """Stacked parts and tensor-parallel shards cut on block boundaries: the layer's weight and multipliers
    dequantize to the dense rows it stands for, and it multiplies as the W8A8 reference does."""
    reader, dense = fp8_matrices
    merged = ColumnParallelLinear(300, [("q_proj", Span(128, 128)), ("k_proj", Span(0, 128)), ("v_proj", Span(128, 72))],
                                  dtype=torch.float32, method=Fp8BlockMethod(BLOCK))
    merged.load_weights(reader, "qkv_proj")
    expected = torch.cat([dense["q_proj"][128:], dense["k_proj"], dense["v_proj"][128:]])
    assert torch.equal(dequantize_blocks(merged.weight, merged.weight_scale_inv, BLOCK), expected)
    row_shard = RowParallelLinear(Span(128, 172), 256, dtype=torch.float32, method=Fp8BlockMethod(BLOCK))
    row_shard.load_weights(reader, "q_proj")
    assert torch.equal(dequantize_blocks(row_shard.weight, row_shard.weight_scale_inv, BLOCK), dense["q_proj"][:, 128:])
    x = torch.randn(3, 300)
    assert torch.equal(merged(x), block_fp8_linear(x, merged.weight, merged.weight_scale_inv, BLOCK))


@pytest.mark.parametrize("parts,message", [
    ([("q_proj", Span(64, 128))], "rows 64..192 of 256 do not fall on"),
    ([("v_proj", Span(0, 200)), ("k_proj", Span(0, 128))], "rows 0..200 of 200 do not fall on"),
])
def test_kept_fp8_shards_off_the_blocks_are_refused(fp8_matrices, parts, message):
    """A shard starting inside a block, or a partial last block with more rows stacked after it."""
    reader, _ = fp8_matrices
    layer = ColumnParallelLinear(300, parts, dtype=torch.float32, method=Fp8BlockMethod(BLOCK))
    with pytest.raises(UnsupportedQuantizationError, match=message):
        layer.load_weights(reader, "qkv_proj")


def test_activation_groups_quantize_to_the_largest_code():
    """Each 128 channels of a row: the largest magnitude becomes 448 exactly, the rest round to e4m3."""
    x = torch.randn(3, 300) * torch.tensor([1e-3, 1.0, 1e3])[:, None]
    x[1, 128:256] = 0
    codes, scale = quantize_groups(x, 128)
    assert scale.shape == (3, 3) and scale[1, 1] == 1e-10 / 448
    deq = codes.float() * scale.repeat_interleave(128, 1)[:, :300]
    for row in range(3):
        for group in range(3):
            cols = slice(group * 128, (group + 1) * 128)
            if x[row, cols].abs().max() > 0:
                assert codes[row, cols].float().abs().max() == FP8_MAX
    assert ((deq - x).abs() <= x.abs() / 16 + 1e-12).all()  # e4m3 keeps 3 mantissa bits


# merged and stacked projections in whole blocks (q 256 rows, k/v 128; gate and up 128 or 384 each)
KEPT_CASES = {
    "qwen3": ("hf-llama", transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "deepseek-v3": (*FAMILIES["deepseek-v3"][:3], {**FAMILIES["deepseek-v3"][3], "intermediate_size": 128,
                                                   "moe_intermediate_size": 128}),
}


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="kept fp8 weights run on e4m3 tensor cores (sm89+)")
@pytest.mark.parametrize("case,mla_absorb", [("qwen3", "none")] + [  # mla_absorb concerns MLA models only
    ("deepseek-v3", mode) for mode in ("none", "absorb-without-precomp", "absorb")])
def test_kept_fp8_weights_on_cuda_match_transformers_on_the_dequantized_weights(tmp_path, case, mla_absorb):
    """W8A8 in bf16 against transformers in float32 on the dequantized weights. Quantizing the activations
    to e4m3 (3 mantissa bits, per 128 channels) moves the logits by a few percent; a wrong multiplier,
    block or layout moves them by about their own size."""
    path, dequantized_path = tmp_path / "fp8", tmp_path / "dequantized"
    reference, model_type = tiny_fp8_checkpoint(KEPT_CASES[case], path, dequantized_path)
    model = load_tiny(path, model_type, "cuda", torch.bfloat16, mla_absorb)
    assert any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    for step, (error,) in enumerate(run_prefill_and_decode(model, [reference], "cuda")):
        assert error <= 0.1, f"step {step} (0 = prefill)"
