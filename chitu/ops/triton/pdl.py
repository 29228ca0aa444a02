"""Programmatic dependent launch (Hopper and later): the decode step's kernels are a few microseconds each,
so the gap between one kernel's last programs and the next one's first is a large share of a batch-1 step.

A kernel launched with `launch_pdl` may be scheduled once every program of the kernel before it in the
stream has called `let_next_start` (or exited), so its start overlaps that kernel's tail. It must call
`wait_for_previous` before it reads anything the kernels before it write, and before it writes anything:
there it waits until the previous kernel has completed and its memory is visible. What it loads before the
wait (a GEMV's weight rows) overlaps the previous kernel. Every kernel launched so waits in every program,
so a kernel past its wait also sees all kernels before the previous one complete.

`launch_options` gives a launch both switches, off where the GPU lacks the feature (or under the
interpreter): then the two calls compile to nothing and the launch is a plain one."""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

# Off until measured on a GPU (benchmarks/profile_decode.py --pdl both turns it on and off to compare).
enabled = False


@lru_cache(maxsize=None)
def _supported(device: torch.device) -> bool:
    return (os.environ.get("TRITON_INTERPRET") != "1" and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch_options(device: torch.device) -> dict:
    """Keyword arguments of a kernel launch with a `PDL: tl.constexpr` parameter."""
    on = enabled and _supported(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def let_next_start(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
