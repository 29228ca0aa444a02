"""AWQ (GEMM) and GPTQ int4 checkpoints: how each lays out its packed tensors, read into one unpacked form.

Both store w = (q - zero) * scale with 4-bit q and zero, one scale and zero per group of input rows and
output column, and pack eight 4-bit values into each int32 (value j in bits 4j..4j+3):

- AWQ (AutoAWQ's WQLinear_GEMM): `qweight` [in, out/8] and `qzeros` [in/group, out/8] packed along the
  outputs in AWQ's interleaved order (value j of word c holds column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[j]);
  `scales` [in/group, out].
- GPTQ (AutoGPTQ, GPTQModel): `qweight` [in/8, out] packed along the inputs in order; `qzeros` [groups, out/8]
  packed along the outputs in order; `scales` [groups, out]; `g_idx` [in], the group of each input row (with
  act-order, `desc_act`, a permutation of the groups). The classic format ("gptq", v1) stores zero - 1
  (vLLM's kernels add the 1 back), "gptq_v2" the zero itself; with `sym` every zero is 8 (as vLLM's
  Marlin kernels take it, ignoring qzeros).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from chitu.checkpoint import CheckpointReader, Shard

PACK = 8  # 4-bit values per int32
# AWQ packs the columns 8c + (0, 2, 4, 6, 1, 3, 5, 7)[j] as value j of word c: this is the value holding each column
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
SYMMETRIC_ZERO = 8
assert sys.byteorder == "little", "unpack_int4 reads the words' bytes in little-endian order"


@dataclass(frozen=True)
class UnpackedPart:
    """One checkpoint matrix (or its shard) unpacked: q [in, out] uint8 in the checkpoint's row order,
    `groups` [in] the group of each row, and zeros / scales [groups, out] for every group of the matrix."""
    q: torch.Tensor
    groups: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words → uint8 values, eight per word along `dim` (value j of word i at position 8i + j).
    Read a byte at a time (little-endian: byte b holds values 2b and 2b + 1): 3x faster than shifting words."""
    dim = dim % packed.dim()
    as_bytes = packed.contiguous().view(torch.uint8).view(*packed.shape, 4)
    values = torch.stack((as_bytes & 0xF, as_bytes >> 4), dim=-1).view(*packed.shape, PACK)
    shape = list(packed.shape)
    shape[dim] *= PACK
    return values.movedim(-1, dim + 1).reshape(shape)


def pack_int4(values: torch.Tensor, dim: int) -> torch.Tensor:
    """unpack_int4's inverse: eight 4-bit values along `dim` into each int32 word."""
    dim = dim % values.dim()
    shape = list(values.shape)
    shape[dim:dim + 1] = [shape[dim] // PACK, PACK]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=values.device).view([-1] + [1] * (values.dim() - dim - 1))
    words = (values.reshape(shape).to(torch.int64) << shifts).sum(dim + 1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _packed_span(start: int, length: int) -> tuple[Shard, int]:
    """The shard of whole packed words (along dim 1) covering values [start, start + length), and the
    offset of `start` in their unpacked values."""
    first, end = start // PACK, -(-(start + length) // PACK)
    return Shard(1, first, end - first), start - first * PACK


@dataclass(frozen=True)
class Int4Format:
    """Settings from `quantization_config`: the format, group size (-1: one group of all input rows),
    and for GPTQ whether zeros are 8 (`sym`) or stored with the v1 offset."""
    name: str  # "awq" or "gptq"
    group_size: int
    sym: bool = False
    zero_offset: int = 0  # added to each stored zero: 1 for GPTQ v1

    def read(self, reader: CheckpointReader, prefix: str, shard: Shard | None, device: torch.device) -> UnpackedPart:
        """Module `prefix`'s weight, cut to `shard` (in HF layout: dim 0 the outputs, dim 1 the inputs)."""
        rows = columns = None
        if shard is not None and shard.dim == 0:
            columns = (shard.start, shard.length)
        elif shard is not None:
            rows = (shard.start, shard.length)
        read = self._read_awq if self.name == "awq" else self._read_gptq
        return read(reader, prefix, rows, columns, device)

    def _read_awq(self, reader, prefix, rows, columns, device) -> UnpackedPart:
        in_features = reader.shape(f"{prefix}.qweight")[0]
        q = self._packed_columns(reader, f"{prefix}.qweight", rows, columns, device, awq_order=True)
        zeros = self._packed_columns(reader, f"{prefix}.qzeros", None, columns, device, awq_order=True)
        scales = self._columns(reader, f"{prefix}.scales", columns, device)
        return UnpackedPart(q, self._implicit_groups(rows, in_features, device), zeros, scales)

    def _read_gptq(self, reader, prefix, rows, columns, device) -> UnpackedPart:
        name = f"{prefix}.qweight"
        in_features = reader.shape(name)[0] * PACK
        if rows is None:
            packed = self._columns(reader, name, columns, device)
        elif rows[0] % PACK or rows[1] % PACK:
            raise ValueError(f"{name}: input rows {rows[0]}..{sum(rows)} of this tensor-parallel shard are not "
                             f"whole packed words of {PACK} rows")
        else:
            packed = reader.read_raw(name, Shard(0, rows[0] // PACK, rows[1] // PACK), device).data
        scales = self._columns(reader, f"{prefix}.scales", columns, device)
        if self.sym:
            zeros = torch.full(scales.shape, SYMMETRIC_ZERO, dtype=torch.uint8, device=device)
        else:
            zeros = self._packed_columns(reader, f"{prefix}.qzeros", None, columns, device) + self.zero_offset
        if reader.has(f"{prefix}.g_idx"):
            groups = reader.read_raw(f"{prefix}.g_idx", None if rows is None else Shard(0, *rows), device).data.long()
        else:
            groups = self._implicit_groups(rows, in_features, device)
        return UnpackedPart(unpack_int4(packed, 0), groups, zeros, scales)

    def _implicit_groups(self, rows, in_features: int, device) -> torch.Tensor:
        """Consecutive groups of group_size rows (without act-order)."""
        first, length = rows or (0, in_features)
        group = in_features if self.group_size == -1 else self.group_size
        return torch.arange(first, first + length, device=device) // group

    @staticmethod
    def _packed_columns(reader, name, rows, columns, device, awq_order: bool = False) -> torch.Tensor:
        """A tensor packed along its columns, unpacked and cut to `columns` (or its `rows`: one or neither)."""
        offset = 0
        if columns is not None:
            shard, offset = _packed_span(*columns)
        else:
            shard = None if rows is None else Shard(0, *rows)
        values = unpack_int4(reader.read_raw(name, shard, device).data, 1)
        if awq_order:
            order = torch.tensor(AWQ_REVERSE_ORDER, device=device)
            values = values.view(values.shape[0], -1, PACK)[:, :, order].reshape(values.shape)
        return values if columns is None else values.narrow(1, offset, columns[1])

    @staticmethod
    def _columns(reader, name, columns, device) -> torch.Tensor:
        return reader.read_raw(name, None if columns is None else Shard(1, *columns), device).data
