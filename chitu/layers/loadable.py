"""The contract between layers and checkpoints: each weight-owning layer reads its own tensors."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from chitu.checkpoint import CheckpointReader


@runtime_checkable
class LoadsWeights(Protocol):
    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        """Fill this layer's parameters from the checkpoint tensors under `prefix` (its module path, Chitu's tensor name)."""


@runtime_checkable
class ProcessesWeights(Protocol):
    def after_loading(self) -> None:
        """Rewrite this layer's weights once the whole checkpoint is in (fold, repack); called after every load."""


def copy_into(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if param.shape != value.shape:
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value)


def sibling(prefix: str, name: str) -> str:
    """The checkpoint name of module `name` next to the module at `prefix` ("a.b.qkv_proj", "q_proj" → "a.b.q_proj")."""
    parent = prefix.rpartition(".")[0]
    return f"{parent}.{name}" if parent else name
