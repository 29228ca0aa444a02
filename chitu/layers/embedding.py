"""Token embedding and the LM head (optionally tied to the embedding)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chitu.checkpoint import CheckpointReader
from chitu.layers.loadable import copy_into


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim, dtype=dtype), requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        name = f"{prefix}.weight"
        copy_into(self.weight, reader.read(name, self.weight.dtype, self.weight.device), name)


class LMHead(nn.Module):
    """Projects hidden states to float32 vocabulary logits; `tied_to` shares that embedding's weight."""

    def __init__(self, vocab_size: int, dim: int, tied_to: Embedding | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.tied = tied_to is not None
        self.weight = tied_to.weight if tied_to is not None else nn.Parameter(
            torch.empty(vocab_size, dim, dtype=dtype), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight).float()

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        if not self.tied:
            name = f"{prefix}.weight"
            copy_into(self.weight, reader.read(name, self.weight.dtype, self.weight.device), name)
