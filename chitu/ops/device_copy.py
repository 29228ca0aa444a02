"""Host data onto the device without waiting for it: a decode step must never block the host on the queue."""
from __future__ import annotations

import torch


def to_device(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`values` (a list, or a host tensor) as a tensor on `device`. On CUDA the copy is staged in pinned memory and
    enqueued asynchronously (the caching host allocator keeps the staging buffer until the copy has run), so it is
    not a host sync."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)

