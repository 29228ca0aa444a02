"""Triton kernels for CUDA tensors. Every module here imports triton; the dispatchers in chitu/ops
import them only where triton is installed, so CPU-only installs never need it."""
import importlib.util

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None


def enabled(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run on `x`: CUDA tensors, triton installed."""
    return AVAILABLE and x.is_cuda

