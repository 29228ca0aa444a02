"""GGUF (ggml) block formats dequantized with torch ops, so it runs on any device.

Each decoder maps uint8 blocks [n_blocks, type_size] to float32 [n_blocks, block_size]
and follows the operation order of `gguf.quants` so results match it bit for bit.
"""
from typing import Callable

import gguf
import torch

QType = gguf.GGMLQuantizationType
QK_K = 256  # elements per super-block of the k-quants


def dequantize(raw: torch.Tensor, qtype: QType, dtype: torch.dtype) -> torch.Tensor:
    """Decode rows of GGUF bytes [..., n_bytes_per_row] into values [..., n_elements_per_row]."""
    decode = _DECODERS.get(qtype)
    if decode is None:
        supported = ", ".join(t.name for t in _DECODERS)
        raise ValueError(f"unsupported GGUF tensor type {QType(qtype).name}; supported: {supported}")
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if raw.dtype != torch.uint8 or raw.shape[-1] % type_size:
        raise ValueError(
            f"{qtype.name} expects uint8 rows of whole {type_size}-byte blocks, "
            f"got {raw.dtype} of shape {tuple(raw.shape)}"
        )
    n_elements = raw.shape[-1] // type_size * block_size
    values = decode(raw.reshape(-1, type_size))
    return values.reshape(*raw.shape[:-1], n_elements).to(dtype)


def _fp16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of each block, as float32 [n_blocks, 1]."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Split every byte into 8 // bits fields, lowest bits first: [..., k] -> [..., 8 // bits, k]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(-2) >> shifts.view(-1, 1)) & ((1 << bits) - 1)


def _k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12 bytes of eight 6-bit scales and eight 6-bit mins of Q4_K / Q5_K."""
    d, m, m_d = packed.reshape(-1, 3, 4).unbind(1)
    scales = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales.float(), mins.float()


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _fp16(blocks, 0)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _unpack(blocks[:, 2:], 4).reshape(len(blocks), 32).float() - 8
    return _fp16(blocks, 0) * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _unpack(blocks[:, 4:], 4).reshape(len(blocks), 32).float()
    return _fp16(blocks, 0) * q + _fp16(blocks, 2)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    q = _unpack(blocks[:, 16:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32).float()
    return _k_quant(blocks, q)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    low = _unpack(blocks[:, 48:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32)
    high = _unpack(blocks[:, 16:48], 1)
    return _k_quant(blocks, (low | (high << 4)).float())


def _k_quant(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: x = d * scale[s] * q - dmin * min[s] for 8 sub-blocks s of 32 values."""
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    d = (_fp16(blocks, 0) * scales).unsqueeze(-1)
    dmin = (_fp16(blocks, 2) * mins).unsqueeze(-1)
    return (d * q - dmin).reshape(-1, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    low = _unpack(blocks[:, :128].reshape(-1, 2, 64), 4).reshape(-1, 8, 32)
    high = _unpack(blocks[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 8, 32)
    q = ((low | (high << 4)).float() - 32).reshape(-1, 16, 16)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (_fp16(blocks, 208) * scales).unsqueeze(-1)
    return (d * q).reshape(-1, QK_K)


_DECODERS: dict[QType, Callable[[torch.Tensor], torch.Tensor]] = {
    QType.F32: _f32,
    QType.F16: _f16,
    QType.BF16: _bf16,
    QType.Q8_0: _q8_0,
    QType.Q4_0: _q4_0,
    QType.Q4_1: _q4_1,
    QType.Q4_K: _q4_k,
    QType.Q5_K: _q5_k,
    QType.Q6_K: _q6_k,
}
