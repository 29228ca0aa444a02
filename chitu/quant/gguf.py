"""GGUF (ggml) block formats dequantized with torch ops, so it runs on any device.

Each decoder maps uint8 blocks [n_blocks, type_size] to float32 [n_blocks, block_size]
and follows the operation order of `gguf.quants` so results match it bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
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


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Split every byte into 8 // bits fields, lowest bits first: [..., k] -> [..., 8 // bits, k]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(-2) >> shifts.view(-1, 1)) & ((1 << bits) - 1)


def _k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12 bytes of eight 6-bit scales and eight 6-bit mins of Q4_K / Q5_K."""
    d, m, m_d = packed.reshape(-1, 3, 4).unbind(1)
    scales = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales, mins


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


@dataclass(frozen=True)
class BlockFields:
    """The fields of quantized blocks, values in their natural order: x = d * scale[s] * (q - offset) - dmin * min[s]
    for the sub-blocks s of `group` values (no scales: one sub-block; no dmin: no subtrahend). Every type's
    formula is this one, in this operation order (Q4_1 stores +m: dmin is -m, exactly)."""
    q: torch.Tensor  # [n_blocks, block_size] codes: uint8, int8 for Q8_0
    offset: int
    d: torch.Tensor  # [n_blocks] float16
    group: int
    scales: torch.Tensor | None = None  # [n_blocks, block_size // group]: uint8, int8 for Q6_K
    dmin: torch.Tensor | None = None  # [n_blocks] float16
    mins: torch.Tensor | None = None  # [n_blocks, block_size // group] uint8

    def dequantize(self) -> torch.Tensor:
        n_blocks, block_size = self.q.shape
        scale = self.d.float()[:, None]
        if self.scales is not None:
            scale = scale * self.scales.float()
        q = self.q.float().view(n_blocks, -1, self.group)
        x = scale.unsqueeze(-1) * (q - self.offset) if self.offset else scale.unsqueeze(-1) * q
        if self.dmin is not None:
            subtrahend = self.dmin.float()[:, None]
            x = x - (subtrahend if self.mins is None else subtrahend * self.mins.float()).unsqueeze(-1)
        return x.reshape(n_blocks, block_size)


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of each block [n_blocks]."""
    return blocks[:, offset: offset + 2].contiguous().view(torch.float16).view(-1)


def _q8_0(blocks: torch.Tensor) -> BlockFields:
    return BlockFields(blocks[:, 2:].contiguous().view(torch.int8), 0, _half(blocks, 0), 32)


def _q4_0(blocks: torch.Tensor) -> BlockFields:
    return BlockFields(_unpack(blocks[:, 2:], 4).reshape(len(blocks), 32), 8, _half(blocks, 0), 32)


def _q4_1(blocks: torch.Tensor) -> BlockFields:
    q = _unpack(blocks[:, 4:], 4).reshape(len(blocks), 32)
    return BlockFields(q, 0, _half(blocks, 0), 32, dmin=-_half(blocks, 2))


def _q4_k(blocks: torch.Tensor) -> BlockFields:
    return _k_quant(blocks, _unpack(blocks[:, 16:].reshape(-1, 4, 32), 4))


def _q5_k(blocks: torch.Tensor) -> BlockFields:
    low = _unpack(blocks[:, 48:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32)
    high = _unpack(blocks[:, 16:48], 1)
    return _k_quant(blocks, low | (high << 4))


def _k_quant(blocks: torch.Tensor, q: torch.Tensor) -> BlockFields:
    """Q4_K / Q5_K: 8 sub-blocks of 32 values with 6-bit scales and mins."""
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    return BlockFields(q.reshape(-1, QK_K), 0, _half(blocks, 0), 32, scales, _half(blocks, 2), mins)


def _q6_k(blocks: torch.Tensor) -> BlockFields:
    low = _unpack(blocks[:, :128].reshape(-1, 2, 64), 4).reshape(-1, 8, 32)
    high = _unpack(blocks[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 8, 32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8)
    return BlockFields((low | (high << 4)).reshape(-1, QK_K), 32, _half(blocks, 208), 16, scales)


FIELDS: dict[QType, Callable[[torch.Tensor], BlockFields]] = {
    QType.Q8_0: _q8_0,
    QType.Q4_0: _q4_0,
    QType.Q4_1: _q4_1,
    QType.Q4_K: _q4_k,
    QType.Q5_K: _q5_k,
    QType.Q6_K: _q6_k,
}


def block_fields(raw: torch.Tensor, qtype: QType) -> BlockFields:
    """The fields of uint8 rows of whole blocks of a quantized type, the blocks of all rows in order."""
    return FIELDS[qtype](raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1]))


_DECODERS: dict[QType, Callable[[torch.Tensor], torch.Tensor]] = {
    QType.F32: _f32,
    QType.F16: _f16,
    QType.BF16: _bf16,
    **{qtype: (lambda blocks, fields=fields: fields(blocks).dequantize()) for qtype, fields in FIELDS.items()},
}
