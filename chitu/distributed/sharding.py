"""Which slice of each weight a rank holds: attention heads, MLP columns, vocabulary rows, layers.

Sizes need not divide evenly: a model with 9 heads in 3 KV groups runs at tp_size=2 with one group
on one rank and two on the other. Query heads always stay with their KV head (GQA); when there are
fewer KV heads than ranks, each KV head is replicated on tp_size / num_kv_heads ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

from chitu.config.schema import ConfigError


@dataclass(frozen=True)
class Span:
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def balanced_span(total: int, parts: int, index: int) -> Span:
    """Part `index` of `total` items cut into `parts` contiguous pieces whose sizes differ by at most one."""
    start, end = total * index // parts, total * (index + 1) // parts
    return Span(start, end - start)


@dataclass(frozen=True)
class HeadShard:
    q_heads: Span
    kv_heads: Span


def head_shard(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadShard:
    """The query and KV heads tensor rank `tp_rank` computes."""
    if num_heads < tp_size:
        raise ConfigError(f"infer.tp_size={tp_size} exceeds the model's {num_heads} attention heads")
    group = num_heads // num_kv_heads  # query heads per KV head
    if num_kv_heads >= tp_size:
        kv = balanced_span(num_kv_heads, tp_size, tp_rank)
        return HeadShard(Span(kv.start * group, kv.length * group), kv)
    if tp_size % num_kv_heads:
        raise ConfigError(f"infer.tp_size={tp_size} must be a multiple of the model's {num_kv_heads} KV heads "
                          f"when it exceeds them")
    replicas = tp_size // num_kv_heads
    if group < replicas:
        raise ConfigError(f"infer.tp_size={tp_size} leaves some rank without a query head "
                          f"({num_heads} heads in {num_kv_heads} KV groups)")
    kv_head = tp_rank // replicas
    q = balanced_span(group, replicas, tp_rank % replicas)
    return HeadShard(Span(kv_head * group + q.start, q.length), Span(kv_head, 1))


def vocab_shard(vocab_size: int, tp_size: int, tp_rank: int) -> tuple[Span, int]:
    """(the real rows this rank holds, the padded row count every rank allocates), so that
    gathered logits line up: rank r holds rows [r * padded, r * padded + real)."""
    padded = -(-vocab_size // tp_size)
    start = min(tp_rank * padded, vocab_size)
    return Span(start, min(padded, vocab_size - start)), padded


def stage_layers(num_layers: int, pp_size: int, pp_rank: int, partition: list[int] | None) -> range:
    """The decoder layers of pipeline stage `pp_rank`: `partition` (infer.pp_layer_partition) or an
    even split with the remainder on the first stages (the last one also computes the LM head)."""
    if partition is None:
        partition = [num_layers // pp_size + (1 if i < num_layers % pp_size else 0) for i in range(pp_size)]
        if min(partition) == 0:
            raise ConfigError(f"infer.pp_size={pp_size} exceeds the model's {num_layers} layers")
    elif len(partition) != pp_size or sum(partition) != num_layers or min(partition) < 1:
        raise ConfigError(f"infer.pp_layer_partition={partition} must be {pp_size} positive layer counts "
                          f"(infer.pp_size) summing to the model's {num_layers} layers")
    start = sum(partition[:pp_rank])
    return range(start, start + partition[pp_rank])
