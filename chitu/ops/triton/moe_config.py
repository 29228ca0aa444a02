"""Launch configurations of the fused MoE kernels: tuned per GPU and shape (benchmarks/tune_moe.py writes
them to moe_configs/<GPU name>.json), a heuristic for everything else. A BlockConfig runs the
tensor-core path (fused_moe.py), a GemvConfig the few-token path (moe_gemv.py)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from chitu.ops.triton.tuned_table import gpu_table

CONFIG_DIR = Path(__file__).with_name("moe_configs")


@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class GemvConfig:
    up_block_n: int    # gate/up columns per program of the first kernel
    down_block_n: int  # output columns per program of the second
    block_k: int
    num_warps: int


MoEConfig = BlockConfig | GemvConfig


def default_config(num_slots: int, num_tokens: int = 0) -> MoEConfig:
    """A heuristic for any shape: GEMVs for one or two tokens, then small row blocks while few slots land
    on each expert (decode)."""
    if 0 < num_tokens <= 2:
        return GemvConfig(16, 16, 256, 4)
    if num_slots <= 64:
        return BlockConfig(16, 64, 128, 1, 4, 4)
    if num_slots <= 1024:
        return BlockConfig(32, 64, 64, 8, 4, 4)
    return BlockConfig(64, 128, 64, 8, 8, 3)


def shape_key(num_experts: int, intermediate: int, hidden: int, top_k: int) -> str:
    return f"E={num_experts},N={intermediate},K={hidden},topk={top_k}"


@lru_cache(maxsize=None)
def _tuned(device_index: int) -> dict[str, dict[int, MoEConfig]]:
    return {shape: {int(tokens): parse_config(config) for tokens, config in by_tokens.items()}
            for shape, by_tokens in gpu_table(CONFIG_DIR, device_index).items()}


def parse_config(fields: dict) -> MoEConfig:
    return GemvConfig(**fields) if "up_block_n" in fields else BlockConfig(**fields)


def config_for(device: torch.device, num_experts: int, intermediate: int, hidden: int, top_k: int,
               num_tokens: int) -> MoEConfig:
    """The tuned configuration of the nearest tuned token count for this GPU and shape, else the heuristic."""
    by_tokens = _tuned(device.index or 0).get(shape_key(num_experts, intermediate, hidden, top_k))
    if not by_tokens:
        return default_config(num_tokens * top_k, num_tokens)
    nearest = min(by_tokens, key=lambda tuned: (abs(tuned - num_tokens), tuned))
    return by_tokens[nearest]
