"""Launch configurations tuned per GPU: the benchmarks/tune_*.py scripts time candidate configurations on
the GPU and write them to <directory>/<GPU name>.json; the kernels read that table and choose for
themselves where it has no entry."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch


def gpu_file(directory: Path, device_index: int = 0) -> Path:
    return directory / f"{torch.cuda.get_device_name(device_index).replace(' ', '_')}.json"


@lru_cache(maxsize=None)
def gpu_table(directory: Path, device_index: int) -> dict:
    """The table tuned for this GPU ({} where none was): shape key → configuration fields."""
    path = gpu_file(directory, device_index)
    return json.loads(path.read_text()) if path.is_file() else {}


def update_table(path: Path, entries: dict) -> None:
    """Merge `entries` into the table at `path` (kept sorted, so reruns diff cleanly)."""
    table = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in entries.items():
        table[key] = {**table[key], **value} if isinstance(value, dict) and isinstance(table.get(key), dict) else value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
