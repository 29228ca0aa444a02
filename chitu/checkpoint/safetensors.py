"""Reader for HF checkpoint directories: config.json + one or more *.safetensors files."""
import json
import math
import os
from glob import glob

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from chitu.checkpoint.reader import CheckpointError, CheckpointReader, RawTensor, Shard

INDEX_FILE = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class SafetensorsReader(CheckpointReader):
    """Opens every weight file once and reads tensors lazily from the memory-mapped files."""

    def __init__(self, path: str):
        self.path = path
        self._handles = {file: safe_open(file, framework="pt") for file in self._weight_files()}
        self._index = {name: file for file, handle in self._handles.items() for name in handle.keys()}

    def _weight_files(self) -> list[str]:
        """The files named by the index when there is one, else every *.safetensors file."""
        index_path = os.path.join(self.path, INDEX_FILE)
        if not os.path.isfile(index_path):
            return sorted(glob(os.path.join(self.path, "*.safetensors")))
        with open(index_path) as f:
            files = sorted({os.path.join(self.path, file) for file in json.load(f)["weight_map"].values()})
        missing = [os.path.basename(file) for file in files if not os.path.isfile(file)]
        if missing:
            raise CheckpointError(f"{INDEX_FILE} in {self.path} names missing files: {', '.join(missing)}")
        return files

    def shape(self, name: str) -> tuple[int, ...]:
        name = self.checkpoint_name(name)
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(
        self,
        name: str,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        shard: Shard | None = None,
    ) -> torch.Tensor:
        return self.read_raw(name, shard, device).data.to(dtype=dtype)

    def read_raw(self, name: str, shard: Shard | None = None, device: str | torch.device = "cpu") -> RawTensor:
        name = self.checkpoint_name(name)
        handle = self._handle(name)
        if shard is None:
            tensor = handle.get_tensor(name)
            shard = Shard(0, 0, tensor.shape[0] if tensor.dim() else 1)
        else:
            self._check_shard(name, shard)
            index = (slice(None),) * shard.dim + (slice(shard.start, shard.start + shard.length),)
            tensor = handle.get_slice(name)[index]
        return RawTensor(tensor.to(device), None, shard)

    def stored_bytes(self, name: str) -> int:
        name = self.checkpoint_name(name)
        stored = self._handle(name).get_slice(name)
        return math.prod(stored.get_shape()) * DTYPE_BYTES[stored.get_dtype()]

    def hf_config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path)

    def tokenizer_source(self) -> tuple[str, dict]:
        return self.path, {}

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
        self._index.clear()

    def _handle(self, name: str):
        if name not in self._index:
            raise self._not_found(name)
        return self._handles[self._index[name]]
