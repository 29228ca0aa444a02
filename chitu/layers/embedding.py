"""Token embedding and LM head, split over tensor ranks by vocabulary rows.

Each rank holds `padded` rows (the last rank's tail is zeros), so the ranks' logits gather into
one [tokens, tp_size * padded] matrix whose first vocab_size columns are the logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chitu.checkpoint import CheckpointReader, Shard
from chitu.distributed.comm import tp_all_gather, tp_all_reduce
from chitu.distributed.parallel_state import parallel_state
from chitu.distributed.sharding import vocab_shard
from chitu.layers.loadable import copy_into
from chitu.ops.linear import linear
from chitu.quant.int8 import int8_linear, quantize_per_channel
from chitu.quant.linear_method import LinearMethod


class VocabParallelRows(nn.Module):
    """A [vocab_size, dim] matrix of which this rank holds rows `span` (padded to `padded`)."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype | None = None, dense: bool = True):
        """dense=False: the rows live elsewhere (a tied embedding's, or a linear method's)."""
        super().__init__()
        state = parallel_state()
        self.vocab_size = vocab_size
        self.span, self.padded = vocab_shard(vocab_size, state.tp_size, state.tp_rank)
        if dense:
            self.weight = nn.Parameter(torch.zeros(self.padded, dim, dtype=dtype), requires_grad=False)

    def load_rows(self, reader: CheckpointReader, name: str) -> None:
        rows = reader.read(name, self.weight.dtype, self.weight.device, Shard(0, self.span.start, self.span.length))
        copy_into(self.weight[: self.span.length], rows, name)


class Embedding(VocabParallelRows):
    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if parallel_state().tp_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.span.start
        mine = (local >= 0) & (local < self.span.length)
        hidden = F.embedding(torch.where(mine, local, 0), self.weight)
        return tp_all_reduce(hidden * mine.unsqueeze(-1).to(hidden.dtype))

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        self.load_rows(reader, f"{prefix}.weight")


class LMHead(VocabParallelRows):
    """Projects hidden states to float32 logits. A tied head shares the embedding's rows when this
    rank has the embedding (`tied_to`), else it reads them from the checkpoint tensor `source`. With
    `int8` (W8A16) the head multiplies an int8 copy of its rows once they are loaded (quant/int8.py);
    with a `method` (quant=gguf) it multiplies the checkpoint's rows as stored; a tied head leaves the
    embedding its own rows."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype | None = None,
                 tied_to: Embedding | None = None, source: str | None = None, int8: bool = False,
                 method: LinearMethod | None = None):
        super().__init__(vocab_size, dim, dtype, dense=tied_to is None and method is None)
        self.tied = tied_to is not None
        self.source = source
        self.int8 = int8
        self.method = method
        if tied_to is not None:
            self.weight = tied_to.weight
        if method is not None:
            method.create_weights(self, self.span.length, dim, dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.method is not None:  # this rank's rows without the padding, which the gather expects
            logits = F.pad(self.method.apply(self, hidden), (0, self.padded - self.span.length))
        elif hasattr(self, "weight_q"):
            logits = int8_linear(hidden, self.weight_q, self.weight_scale)
        else:
            logits = linear(hidden, self.weight)
        return tp_all_gather(logits)[:, : self.vocab_size].float()

    def after_loading(self) -> None:
        if not self.int8 or hasattr(self, "weight_q"):
            return
        q, scale = quantize_per_channel(self.weight, self.weight.dtype)
        self.weight_q = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        if not self.tied:
            del self.weight

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        source = self.source or prefix
        if self.method is not None:
            self.method.load(self, reader, [(source, Shard(0, self.span.start, self.span.length))])
        elif not self.tied:
            self.load_rows(reader, f"{source}.weight")
