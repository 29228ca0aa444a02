"""Reader for GGUF files (llama.cpp), presenting tensors under Chitu's names and in HF layout."""
import math
import os
import re
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

from chitu.checkpoint.gguf_config import config_from_metadata
from chitu.checkpoint.gguf_names import chitu_tensors
from chitu.checkpoint.reader import CheckpointError, CheckpointReader, RawTensor, Shard
from chitu.quant.gguf import dequantize

# Architectures whose GGUF converter (convert_hf_to_gguf.py) permutes the rows of Q and K per head.
PERMUTED_QK_ARCHITECTURES = {"llama"}


class _Reader(gguf.GGUFReader):
    """gguf's reader over a plain-array view of its memory map: each slice of an np.memmap is a memmap again,
    whose bookkeeping made reading the metadata (a vocabulary of ~50k strings) three times slower."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mapped: np.ndarray) -> None:
        self._plain = mapped.view(np.ndarray)


@dataclass(frozen=True)
class _Tensor:
    stored: gguf.ReaderTensor
    shape: tuple[int, ...]  # HF layout (GGUF dims reversed), of one expert's slice when `expert` is set
    permuted_head_dim: int | None  # head size when the rows are llama.cpp-permuted Q/K
    expert: int | None = None  # the slice of a stacked experts tensor

    def data(self) -> np.ndarray:
        """The stored bytes (or values), [..., bytes per row]."""
        return self.stored.data if self.expert is None else self.stored.data[self.expert]


@dataclass(frozen=True)
class _SplitKvB:
    """kv_b_proj as llama.cpp's converter stores it since its MLA rework: per head, the key half transposed
    (attn_k_b [heads, kv_lora_rank, nope]) and the value half (attn_v_b [heads, v_head_dim, kv_lora_rank])."""
    k_b: str  # the halves' names in the reader
    v_b: str
    heads: int
    nope: int
    v_dim: int
    latent: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.heads * (self.nope + self.v_dim), self.latent

    def join(self, k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
        """The HF kv_b_proj weight: each head's nope key rows, then its value rows."""
        return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(self.shape)


class GGUFCheckpointReader(CheckpointReader):
    """Reads a GGUF file (or the parts of a split one: `name-00001-of-00003.gguf` ...) through memory maps, under
    Chitu's names (gguf_names.py), dequantizing each tensor as it is read. GGUF tensors Chitu has no use for
    (llama 3's rope_freqs) are not listed."""

    def __init__(self, path: str):
        self.path = self.gguf_path = path
        readers = []
        for part in split_parts(path):
            try:
                readers.append(_Reader(part))
            except (OSError, ValueError) as error:
                raise CheckpointError(f"cannot open GGUF file {part}: {error}") from error
        try:
            self._config = _load_config(path, readers)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot open GGUF file {path}: {error}") from error
        architecture = readers[0].fields["general.architecture"].contents()  # the first part holds the metadata
        self._index = {name: t for reader in readers for name, t in self._map_tensors(reader, architecture).items()}
        self._index.update(self._split_kv_b())

    def _map_tensors(self, reader: gguf.GGUFReader, architecture: str) -> dict[str, _Tensor]:
        tensors = {}
        for stored in reader.tensors:
            shape = tuple(int(dim) for dim in reversed(stored.shape))
            for tensor in chitu_tensors(architecture, stored.name, num_experts=shape[0] if len(shape) == 3 else 0):
                heads = self._permuted_heads(architecture, tensor.kind)
                own_shape = shape if tensor.expert is None else shape[1:]
                tensors[tensor.name] = _Tensor(stored, own_shape, own_shape[0] // heads if heads else None, tensor.expert)
        return tensors

    def _split_kv_b(self) -> dict[str, _SplitKvB]:
        """kv_b_proj of each layer stored as attn_k_b / attn_v_b, under its own name."""
        joined = {}
        for name in [n for n in self._index if n.endswith(".kv_b_proj.k_b.weight")]:
            v_b = name.replace(".k_b.", ".v_b.")
            if v_b not in self._index:
                raise CheckpointError(f"{self.path} holds {name} but not {v_b}: kv_b_proj is incomplete")
            (heads, latent, nope), v_dim = self._index[name].shape, self._index[v_b].shape[1]
            joined[name.replace(".k_b.weight", ".weight")] = _SplitKvB(name, v_b, heads, nope, v_dim, latent)
        return joined

    def _permuted_heads(self, architecture: str, kind: str) -> int | None:
        if architecture not in PERMUTED_QK_ARCHITECTURES:
            return None
        n_heads = self._config.num_attention_heads
        if kind == "attn_q":
            return n_heads
        if kind == "attn_k":
            return getattr(self._config, "num_key_value_heads", None) or n_heads
        return None

    def use_renames(self, renames: tuple[tuple[str, str], ...]) -> None:
        """Nothing to rename: GGUF names map to Chitu's directly, whatever HF calls them."""

    def shape(self, name: str) -> tuple[int, ...]:
        return self._lookup(name).shape

    def read(
        self,
        name: str,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        shard: Shard | None = None,
    ) -> torch.Tensor:
        tensor = self._lookup(name)
        if isinstance(tensor, _SplitKvB):
            whole = tensor.join(self.read(tensor.k_b, torch.float32, device),
                                self.read(tensor.v_b, torch.float32, device))
            return (whole if shard is None else whole.narrow(shard.dim, shard.start, shard.length)).to(dtype)
        raw = self.read_raw(name, shard, device)
        shard = shard or raw.shard
        try:
            values = dequantize(raw.data, tensor.stored.tensor_type, dtype)
        except ValueError as error:
            raise CheckpointError(f"cannot decode tensor {name!r} in {self.path}: {error}") from error
        return values.narrow(shard.dim, shard.start - raw.shard.start, shard.length).contiguous()

    def read_raw(self, name: str, shard: Shard | None = None, device: str | torch.device = "cpu") -> RawTensor:
        """The stored blocks of a window holding `shard` that spans whole quantization blocks (and
        permuted heads), as uint8 rows [..., bytes per row], rows in HF order (Q/K rows unpermuted)."""
        tensor = self._lookup(name)
        if shard is None:
            shard = Shard(0, 0, tensor.shape[0])
        else:
            self._check_shard(name, shard)
        if isinstance(tensor, _SplitKvB):  # joined in float32, as an F32 tensor would be stored
            rows = self.read(name, torch.float32, device, shard)
            return RawTensor(rows.contiguous().view(torch.uint8), "F32", shard)
        window = _decodable_window(tensor, shard)
        raw = torch.from_numpy(_window_bytes(tensor, window)).to(device)
        if tensor.permuted_head_dim:
            raw = _unpermute_rows(raw, tensor.permuted_head_dim)
        return RawTensor(raw, gguf.GGMLQuantizationType(tensor.stored.tensor_type).name, window)

    def stored_bytes(self, name: str) -> int:
        tensor = self._lookup(name)
        if isinstance(tensor, _SplitKvB):
            return self.stored_bytes(tensor.k_b) + self.stored_bytes(tensor.v_b)
        return int(tensor.data().nbytes)

    def hf_config(self) -> PretrainedConfig:
        return self._config

    def tokenizer_source(self) -> tuple[str, dict]:
        directory, file = os.path.split(self.gguf_path)
        return directory, {"gguf_file": file}

    def close(self) -> None:
        self._index.clear()  # drops the last references to the memory map

    def _lookup(self, name: str) -> _Tensor | _SplitKvB:
        if name not in self._index:
            raise self._not_found(name)
        return self._index[name]


SPLIT_PART = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_parts(path: str) -> list[str]:
    """The files of a split GGUF model named by its first part (llama.cpp's gguf-split names them
    `stem-00001-of-0000N.gguf`); [path] for a whole file. A missing part is named."""
    match = SPLIT_PART.match(path)
    if match is None:
        return [path]
    count = int(match["count"])
    if match["part"] != "00001":
        raise CheckpointError(f"{path} is part {int(match['part'])} of a split GGUF model: name its first part, "
                              f"{match['stem']}-00001-of-{match['count']}.gguf, or the directory holding the parts")
    parts = [f"{match['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    missing = [os.path.basename(p) for p in parts if not os.path.isfile(p)]
    if missing:
        raise CheckpointError(f"the split GGUF model {os.path.basename(path)} misses its part(s) {', '.join(missing)}")
    return parts


def first_split_part(files: list[str]) -> str | None:
    """The first part, when `files` are the parts of one split GGUF model (a missing part is named)."""
    first_parts = [f for f in files if (match := SPLIT_PART.match(f)) and match["part"] == "00001"]
    if len(first_parts) == 1 and set(split_parts(first_parts[0])) >= set(files):
        return first_parts[0]
    return None


def _load_config(path: str, readers: list[gguf.GGUFReader]) -> PretrainedConfig:
    """Chitu's own config for the MoE architectures and dense llama (gguf_config.py), transformers' for the others."""
    config = config_from_metadata(readers, path)
    if config is not None:
        return config
    directory, file = os.path.split(path)
    config = AutoConfig.from_pretrained(directory, gguf_file=file)
    if not any(t.name == "output.weight" for reader in readers for t in reader.tensors):
        config.tie_word_embeddings = True
    return config


def _decodable_window(tensor: _Tensor, shard: Shard) -> Shard:
    """The smallest shard holding `shard` that spans whole quantization blocks and permuted heads."""
    step = 1
    if shard.dim == len(tensor.shape) - 1:
        step = gguf.GGML_QUANT_SIZES[tensor.stored.tensor_type][0]
    if shard.dim == 0 and tensor.permuted_head_dim:
        step = math.lcm(step, tensor.permuted_head_dim)
    start = shard.start // step * step
    end = math.ceil((shard.start + shard.length) / step) * step
    return Shard(shard.dim, start, end - start)


def _window_bytes(tensor: _Tensor, window: Shard) -> np.ndarray:
    """A copy of the window's raw bytes, [..., bytes per row], out of the read-only memory map."""
    begin, end = window.start, window.start + window.length
    if window.dim == len(tensor.shape) - 1:
        block_size, type_size = gguf.GGML_QUANT_SIZES[tensor.stored.tensor_type]
        begin, end = begin // block_size * type_size, end // block_size * type_size
    index = (slice(None),) * window.dim + (slice(begin, end),)
    return np.array(tensor.data().view(np.uint8)[index])


def _unpermute_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Invert convert_hf_to_gguf's per-head reshape(2, head_dim // 2).swapaxes of Q/K rows."""
    return weight.reshape(-1, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
