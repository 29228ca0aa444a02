"""Quantized rows in the layout the GPU kernels read (ops/triton/grouped_codes.py): GGUF blocks repacked at load,
losslessly, and int8 rows with a scale per output channel (W8A16).

w[n, k] = d[n, k // super] * scale[n, k // group] * (q[n, k] - offset) - dmin[n, k // super] * min[n, k // 32]
(quant/gguf.py's BlockFields, one formula for every type). GGUF blocks interleave their fields (18 to 210 bytes a
block, fp16 scales at odd offsets), which no vector load takes; here each field is a tensor of its own:
- `low`: the low 4 bits of the codes, two a byte: byte t of each 32-value group holds value t (low nibble) and
  value t + 16 (high nibble) — Q4_0's order. 8-bit codes (Q8_0, int8) are int8 values in their natural order.
- `high`: the codes' bits above 4 (Q5_K: 1, Q6_K: 2) of the two values of each `low` byte, packed from bit 0 up.
- `d`, `dmin` per super-block (float16 for GGUF, the compute dtype for int8 rows), `scales` / `mins` per group.
Q4_K and Q5_K take 4 bytes more per 256 values (their 6-bit scales and mins a byte each); the others none.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import gguf
import torch

from chitu.quant.gguf import QType, block_fields


@dataclass(frozen=True)
class GroupedCodes:
    low: torch.Tensor  # [n, k // 2] uint8, or [n, k] int8 when bits == 8
    high: torch.Tensor | None  # [n, k * (bits - 4) // 8] uint8
    d: torch.Tensor  # [n, k // super]
    scales: torch.Tensor | None  # [n, k // group] uint8 / int8
    dmin: torch.Tensor | None  # [n, k // super]
    mins: torch.Tensor | None  # [n, k // group] uint8
    bits: int
    offset: int
    group: int
    super_block: int

    @property
    def shape(self) -> tuple[int, int]:
        n = self.low.shape[0]
        return n, self.low.shape[1] * (1 if self.bits == 8 else 2)

    @classmethod
    def from_gguf(cls, blocks: torch.Tensor, qtype: str) -> GroupedCodes:
        """GGUF rows [n, bytes] of a quantized type, repacked."""
        block_size = gguf.GGML_QUANT_SIZES[QType[qtype]][0]
        n = blocks.shape[0]
        f = block_fields(blocks.cpu(), QType[qtype])
        k = f.q.numel() // n
        bits = {"Q5_K": 5, "Q6_K": 6}.get(qtype, 8 if f.q.dtype == torch.int8 else 4)
        low, high = _pack_codes(f.q.reshape(n, k), bits)
        fields_per_row = [None if t is None else t.reshape(n, -1).contiguous() for t in (f.d, f.scales, f.dmin, f.mins)]
        return cls(low, high, *fields_per_row, bits, f.offset, f.group, block_size)

    @classmethod
    def from_int8(cls, q: torch.Tensor, scale: torch.Tensor) -> GroupedCodes:
        """int8 rows [n, k] with one scale per row (quant/int8.py)."""
        n, k = q.shape
        return cls(q.contiguous(), None, scale.reshape(n, 1).contiguous(), None, None, None, 8, 0, k, k)

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def to(self, device: torch.device) -> GroupedCodes:
        return replace(self, **{name: t.to(device) for name, t in self._tensors().items()})

    def rows(self, start: int, stop: int) -> GroupedCodes:
        return replace(self, **{name: t[start:stop] for name, t in self._tensors().items()})

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def codes(self) -> torch.Tensor:
        """q [n, k] in the natural order, as int32."""
        n, k = self.shape
        if self.bits == 8:
            return self.low.int()
        low, high = self.low.int() & 15, self.low.int() >> 4
        if self.high is not None:
            extra_bits = self.bits - 4
            per_byte = 8 // (2 * extra_bits)
            shifts = (torch.arange(k // 2, device=low.device) % per_byte) * 2 * extra_bits
            pair = (self.high.int().repeat_interleave(per_byte, dim=1) >> shifts) & ((1 << 2 * extra_bits) - 1)
            low = low | ((pair & ((1 << extra_bits) - 1)) << 4)
            high = high | ((pair >> extra_bits) << 4)
        return torch.stack((low.view(n, k // 32, 16), high.view(n, k // 32, 16)), dim=2).reshape(n, k)

    def dequantize(self) -> torch.Tensor:
        """w [n, k] in float32, in BlockFields.dequantize's operation order (bitwise the GGUF reference)."""
        n, k = self.shape
        scale = _per_value(self.d.float(), k)
        if self.scales is not None:
            scale = scale * _per_value(self.scales.float(), k)
        q = self.codes().float()
        w = scale * (q - self.offset) if self.offset else scale * q
        if self.dmin is not None:
            subtrahend = _per_value(self.dmin.float(), k)
            w = w - (subtrahend if self.mins is None else subtrahend * _per_value(self.mins.float(), k))
        return w


def _per_value(field: torch.Tensor, k: int) -> torch.Tensor:
    return field.repeat_interleave(k // field.shape[1], dim=1)


def _pack_codes(q: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, k = q.shape
    if bits == 8:
        return q.contiguous(), None
    halves = q.view(n, k // 32, 2, 16)
    low = (halves[:, :, 0] & 15) | ((halves[:, :, 1] & 15) << 4)
    if bits == 4:
        return low.reshape(n, k // 2).contiguous(), None
    extra_bits = bits - 4
    pair = (halves[:, :, 0] >> 4) | ((halves[:, :, 1] >> 4) << extra_bits)  # 2 * extra_bits bits per low byte
    per_byte = 8 // (2 * extra_bits)
    pair = pair.reshape(n, k // 2 // per_byte, per_byte)
    high = torch.zeros(n, pair.shape[1], dtype=torch.uint8)
    for i in range(per_byte):
        high |= pair[:, :, i] << (2 * extra_bits * i)
    return low.reshape(n, k // 2).contiguous(), high
