"""Routed experts held in host memory (cpu_layer_num) for a model on the GPU: the step's hidden states and routing
go to pinned host memory, waiting only for the work this stream queued before them; the CPU kernels compute the
experts on the process's threads; the sum goes back asynchronously."""
from __future__ import annotations

import torch

from chitu.layers.moe.experts import StackedExperts


def run_on_host(experts: StackedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """experts(x, weights, ids) for x on any device, the experts in host memory."""
    if x.device.type == "cpu":
        return experts(x, weights, ids)
    host = [t.to("cpu", non_blocking=True) for t in (x, weights, ids)]  # into pinned memory
    copied = torch.cuda.Event()
    copied.record()
    copied.synchronize()
    return experts(*host).pin_memory().to(x.device, non_blocking=True)
