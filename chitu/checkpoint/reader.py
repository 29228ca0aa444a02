"""The per-tensor checkpoint reader interface, and `open_checkpoint` to pick one for a path."""
from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from glob import glob
from typing import TYPE_CHECKING

import torch

from chitu.errors import UserError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class CheckpointError(UserError):
    """A checkpoint cannot be opened or read; the message names the path (and tensor)."""


@dataclass(frozen=True)
class Shard:
    """A contiguous slice [start, start + length) of a tensor along `dim`, in HF layout."""

    dim: int
    start: int
    length: int


@dataclass(frozen=True)
class RawTensor:
    """A tensor as the checkpoint stores it, for linear methods that keep the stored format."""

    data: torch.Tensor   # the stored dtype; GGUF: uint8 rows of whole quantization blocks
    qtype: str | None    # GGUF's quantization type ("Q4_1", "F32", ...); None for a plain tensor
    shard: Shard         # the part of the tensor `data` holds (GGUF widens a shard to whole blocks)


class CheckpointReader(ABC):
    """Reads tensors one at a time, by Chitu's name (its module path, which is the usual HF name) and
    in HF layout, from a checkpoint."""

    path: str
    _index: dict  # checkpoint name -> where the reader finds that tensor
    _renames: tuple[tuple[re.Pattern, str], ...] = ()

    def names(self) -> list[str]:
        """The checkpoint's tensor names, e.g. "model.layers.0.self_attn.q_proj.weight"."""
        return list(self._index)

    def has(self, name: str) -> bool:
        return self.checkpoint_name(name) in self._index

    def use_renames(self, renames: tuple[tuple[str, str], ...]) -> None:
        """Map Chitu's names to this checkpoint's by (pattern, replacement) regexes, applied in order:
        an architecture's HF spelling of its tensors (registry.Architecture.hf_renames)."""
        self._renames = tuple((re.compile(pattern), replacement) for pattern, replacement in renames)

    def checkpoint_name(self, name: str) -> str:
        for pattern, replacement in self._renames:
            name = pattern.sub(replacement, name)
        return name

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Shape in HF layout, e.g. (out_features, in_features) for a linear weight."""

    @abstractmethod
    def read(
        self,
        name: str,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        shard: Shard | None = None,
    ) -> torch.Tensor:
        """Read one tensor (or only its `shard`) as `dtype` on `device`."""

    @abstractmethod
    def read_raw(self, name: str, shard: Shard | None = None, device: str | torch.device = "cpu") -> RawTensor:
        """Read one tensor (or a part holding its `shard`) as stored, without converting or dequantizing it."""

    @abstractmethod
    def stored_bytes(self, name: str) -> int:
        """How many bytes the tensor takes as stored (quantized blocks, or values of the stored dtype)."""

    @abstractmethod
    def hf_config(self) -> PretrainedConfig: ...

    @abstractmethod
    def tokenizer_source(self) -> tuple[str, dict]:
        """(path, kwargs) for `transformers.AutoTokenizer.from_pretrained(path, **kwargs)`."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _not_found(self, name: str) -> CheckpointError:
        return CheckpointError(f"tensor {name!r} not found in {self.path}")

    def _check_shard(self, name: str, shard: Shard) -> None:
        shape = self.shape(name)
        in_bounds = 0 <= shard.dim < len(shape) and 0 <= shard.start < shard.start + shard.length <= shape[shard.dim]
        if not in_bounds:
            raise CheckpointError(f"{shard} is out of bounds for tensor {name!r} of shape {shape} in {self.path}")


def open_checkpoint(path: str) -> CheckpointReader:
    """Open a safetensors directory (HF layout), a .gguf file (the first part of a split one), or a directory
    holding one .gguf or the parts of one split GGUF model."""
    # Imported here because both readers import this module.
    from chitu.checkpoint.gguf import GGUFCheckpointReader, first_split_part
    from chitu.checkpoint.safetensors import SafetensorsReader

    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return GGUFCheckpointReader(path)
        raise CheckpointError(f"unsupported checkpoint file {path}: expected a .gguf file or a directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if glob(os.path.join(path, "*.safetensors")):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"no config.json next to the *.safetensors files in {path}")
        return SafetensorsReader(path)
    gguf_files = sorted(glob(os.path.join(path, "*.gguf")))
    first_part = first_split_part(gguf_files)
    if first_part is not None:
        return GGUFCheckpointReader(first_part)
    if len(gguf_files) > 1:
        names = ", ".join(os.path.basename(f) for f in gguf_files)
        raise CheckpointError(f"several .gguf files in {path} ({names}): pass the path of one of them")
    if gguf_files:
        return GGUFCheckpointReader(gguf_files[0])
    raise CheckpointError(f"no *.safetensors or *.gguf weights in {path}")
