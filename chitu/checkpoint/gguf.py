"""Reader for GGUF files (llama.cpp), presenting tensors under HF names and in HF layout."""
import math
import os
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from chitu.checkpoint.reader import CheckpointError, CheckpointReader, Shard
from chitu.quant.gguf import dequantize

# Architectures whose GGUF converter (convert_hf_to_gguf.py) permutes the rows of Q and K per head.
PERMUTED_QK_ARCHITECTURES = {"llama"}


@dataclass(frozen=True)
class _Tensor:
    stored: gguf.ReaderTensor
    shape: tuple[int, ...]  # HF layout: GGUF dims reversed
    permuted_head_dim: int | None  # head size when the rows are llama.cpp-permuted Q/K


class GGUFCheckpointReader(CheckpointReader):
    """Reads one GGUF file through a memory map, dequantizing each tensor as it is read.

    GGUF tensors with no HF counterpart (e.g. llama 3's rope_freqs) are not listed.
    """

    def __init__(self, path: str):
        self.path = self.gguf_path = path
        try:
            reader = gguf.GGUFReader(path)
            self._config = _load_config(path, has_output=any(t.name == "output.weight" for t in reader.tensors))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot open GGUF file {path}: {error}") from error
        self._index = self._map_tensors(reader)

    def _map_tensors(self, reader: gguf.GGUFReader) -> dict[str, _Tensor]:
        """HF name -> GGUF tensor, through gguf's own name map applied to the HF model's parameter names."""
        architecture = reader.fields["general.architecture"].contents()
        name_map = gguf.get_tensor_name_map(self._gguf_arch(architecture), self._config.num_hidden_layers)
        by_gguf_name = {tensor.name: tensor for tensor in reader.tensors}
        tensors = {}
        for hf_name in _hf_parameter_names(self._config):
            found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
            if found is None or found[1] not in by_gguf_name:
                continue
            kind, gguf_name = found
            stored = by_gguf_name[gguf_name]
            shape = tuple(int(dim) for dim in reversed(stored.shape))
            heads = self._permuted_heads(architecture, kind)
            tensors[hf_name] = _Tensor(stored, shape, shape[0] // heads if heads else None)
        return tensors

    def _gguf_arch(self, architecture: str) -> gguf.MODEL_ARCH:
        for arch, name in gguf.MODEL_ARCH_NAMES.items():
            if name == architecture:
                return arch
        raise CheckpointError(f"GGUF architecture {architecture!r} of {self.path} is unknown to the gguf package")

    def _permuted_heads(self, architecture: str, kind: gguf.MODEL_TENSOR) -> int | None:
        if architecture not in PERMUTED_QK_ARCHITECTURES:
            return None
        n_heads = self._config.num_attention_heads
        if kind == gguf.MODEL_TENSOR.ATTN_Q:
            return n_heads
        if kind == gguf.MODEL_TENSOR.ATTN_K:
            return getattr(self._config, "num_key_value_heads", None) or n_heads
        return None

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
        if shard is None:
            shard = Shard(0, 0, tensor.shape[0])
        else:
            self._check_shard(name, shard)
        window = _decodable_window(tensor, shard)
        raw = torch.from_numpy(_window_bytes(tensor, window)).to(device)
        try:
            values = dequantize(raw, tensor.stored.tensor_type, dtype)
        except ValueError as error:
            raise CheckpointError(f"cannot decode tensor {name!r} in {self.path}: {error}") from error
        if tensor.permuted_head_dim:
            values = _unpermute_rows(values, tensor.permuted_head_dim)
        return values.narrow(shard.dim, shard.start - window.start, shard.length).contiguous()

    def hf_config(self) -> PretrainedConfig:
        return self._config

    def tokenizer_source(self) -> tuple[str, dict]:
        directory, file = os.path.split(self.gguf_path)
        return directory, {"gguf_file": file}

    def close(self) -> None:
        self._index.clear()  # drops the last references to the memory map

    def _lookup(self, name: str) -> _Tensor:
        if name not in self._index:
            raise self._not_found(name)
        return self._index[name]


def _load_config(path: str, has_output: bool) -> PretrainedConfig:
    directory, file = os.path.split(path)
    config = AutoConfig.from_pretrained(directory, gguf_file=file)
    if not has_output:
        config.tie_word_embeddings = True
    return config


def _hf_parameter_names(config: PretrainedConfig) -> list[str]:
    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(config).state_dict())


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
    return np.array(tensor.stored.data.view(np.uint8)[index])


def _unpermute_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Invert convert_hf_to_gguf's per-head reshape(2, head_dim // 2).swapaxes of Q/K rows."""
    return weight.reshape(-1, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
