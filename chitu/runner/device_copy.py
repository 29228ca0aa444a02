"""Host data onto the device without waiting for it: a decode step must never block the host on the queue."""
from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device`. On CUDA the copy is staged in pinned memory and enqueued asynchronously
    (the caching host allocator keeps the staging buffer until the copy has run), so it is not a host sync."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)

