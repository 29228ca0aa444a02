import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from chitu.quant.gguf import dequantize

QType = gguf.GGMLQuantizationType
FLOAT_TYPES = [QType.F32, QType.F16, QType.BF16]
# Byte offsets of the fp16 scale fields inside one block; random bytes there could be inf/nan.
FP16_FIELDS = {
    QType.Q8_0: (0,),
    QType.Q4_0: (0,),
    QType.Q4_1: (0, 2),
    QType.Q4_K: (0, 2),
    QType.Q5_K: (0, 2),
    QType.Q6_K: (208,),
}
ROW_SHAPES = [(3, 5), (1, 1), (7, 2), (2, 3, 2)]  # leading dims..., blocks per row
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_rows(qtype: QType, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Valid GGUF bytes [*shape[:-1], shape[-1] * type_size] with finite scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in FLOAT_TYPES:
        values = rng.standard_normal((*shape[:-1], shape[-1] * block_size)).astype(np.float32)
        if qtype == QType.F16:
            values = values.astype(np.float16)
        elif qtype == QType.BF16:
            values = (values.view(np.uint32) >> 16).astype(np.uint16)
        return values.view(np.uint8)
    blocks = rng.integers(0, 256, size=(*shape, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scale = (rng.standard_normal(shape) * 0.1).astype(np.float16)
        blocks[..., offset : offset + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(*shape[:-1], shape[-1] * type_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("qtype", FLOAT_TYPES + list(FP16_FIELDS), ids=lambda t: t.name)
def test_matches_gguf_numpy_bitwise(qtype: QType, shape: tuple[int, ...], device: str):
    raw = random_rows(qtype, shape, np.random.default_rng(int(qtype) * 100 + len(shape)))
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))

    actual = dequantize(torch.from_numpy(raw).to(device), qtype, torch.float32)

    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    assert torch.equal(actual.cpu(), expected)


def test_casts_to_requested_dtype():
    raw = random_rows(QType.Q4_K, (4, 2), np.random.default_rng(0))
    expected = torch.from_numpy(gguf.quants.dequantize(raw, QType.Q4_K))

    actual = dequantize(torch.from_numpy(raw), QType.Q4_K, torch.bfloat16)

    assert actual.dtype == torch.bfloat16
    assert torch.equal(actual, expected.to(torch.bfloat16))


def test_unsupported_type_names_it_and_the_supported_ones():
    with pytest.raises(ValueError, match="Q2_K") as error:
        dequantize(torch.zeros(84, dtype=torch.uint8), QType.Q2_K, torch.float32)
    assert all(name in str(error.value) for name in ["Q8_0", "Q4_K", "Q6_K", "BF16"])


def test_rejects_partial_blocks():
    with pytest.raises(ValueError, match="34-byte blocks"):
        dequantize(torch.zeros(2, 35, dtype=torch.uint8), QType.Q8_0, torch.float32)
