"""Routed experts held in host memory (cpu_layer_num) for a model on the GPU: the step's hidden states and routing
go to pinned host memory, waiting only for the work this stream queued before them; the CPU kernels compute the
experts on the process's threads; the sum goes back asynchronously.

Inside a CUDA graph (infer.use_cuda_graph) the same happens as graph nodes: copies into pinned staging buffers, a
host-function node that runs the experts (cuLaunchHostFunc; the stream waits for it as it would for a kernel), the
copy back. The staging buffers are made in the eager warm-up that precedes each capture (`for_capture`), one set per
token count, shared by the layers (a step runs them one after another), so that the capture allocates nothing."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from chitu.layers.moe.experts import StackedExperts

logger = logging.getLogger(__name__)

HOST_FUNCTION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@dataclass
class _Staging:
    x: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    out: torch.Tensor


_staging: dict[tuple, _Staging] = {}
_preparing_capture = False
_host_functions: list = []  # every captured node's callback, alive as long as the process (the graphs may be)


@contextlib.contextmanager
def for_capture() -> Iterator[None]:
    """Host expert calls inside take the graph path: staging buffers (made here when missing) and a host-function
    node. runner/cuda_graph.capture_graphs wraps each warm-up and capture in it."""
    global _preparing_capture
    previous, _preparing_capture = _preparing_capture, True
    try:
        yield
    finally:
        _preparing_capture = previous


def run_on_host(experts: StackedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """experts(x, weights, ids) for x on any device, the experts in host memory."""
    if x.device.type == "cpu":
        return experts(x, weights, ids)
    if _preparing_capture:
        return _through_host_function(experts, x, weights, ids)
    host = [t.to("cpu", non_blocking=True) for t in (x, weights, ids)]  # into pinned memory
    copied = torch.cuda.Event()
    copied.record()
    copied.synchronize()
    return experts(*host).pin_memory().to(x.device, non_blocking=True)


def _through_host_function(experts: StackedExperts, x: torch.Tensor, weights: torch.Tensor,
                           ids: torch.Tensor) -> torch.Tensor:
    staging = _staging_for(x, weights, ids)
    for buffer, t in ((staging.x, x), (staging.weights, weights), (staging.ids, ids)):
        buffer.copy_(t, non_blocking=True)

    def run(_: int | None) -> None:
        try:
            with torch.inference_mode():
                staging.out.copy_(experts(staging.x, staging.weights, staging.ids))
        except BaseException:  # an exception cannot cross the driver's thread: say it, leave NaNs downstream
            logger.exception("the host experts failed inside a CUDA graph")
            staging.out.fill_(float("nan"))

    callback = HOST_FUNCTION(run)
    _host_functions.append(callback)
    _launch_host_function(callback)
    return staging.out.to(x.device, non_blocking=True)


def _staging_for(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> _Staging:
    key = (tuple(x.shape), x.dtype, tuple(weights.shape), weights.dtype, ids.dtype)
    if key not in _staging:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"no staging buffers for host experts of shape {key}: capture after a warm-up of it "
                               "inside host_experts.for_capture()")
        _staging[key] = _Staging(*(_pinned(shape, dtype) for shape, dtype in (
            (x.shape, x.dtype), (weights.shape, weights.dtype), (ids.shape, ids.dtype), (x.shape, x.dtype))))
    return _staging[key]


def _pinned(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Host memory registered with CUDA itself, not taken from torch's pinned cache, which records events on its
    blocks' streams: a graph's copies must not."""
    t = torch.empty(shape, dtype=dtype)
    result = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), max(1, t.numel() * t.element_size()), 0)
    if int(result) != 0:
        raise RuntimeError(f"cudaHostRegister failed with cudaError {int(result)}")
    return t


def _launch_host_function(callback) -> None:
    """Queue callback on the current CUDA stream (a host node when the stream is capturing)."""
    driver = _driver()
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    result = driver.cuLaunchHostFunc(stream, callback, None)
    if result != 0:
        raise RuntimeError(f"cuLaunchHostFunc failed with CUresult {result}")


@functools.cache
def _driver() -> ctypes.CDLL:
    library = ctypes.CDLL("libcuda.so.1")
    library.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, HOST_FUNCTION, ctypes.c_void_p]
    library.cuLaunchHostFunc.restype = ctypes.c_int
    return library
