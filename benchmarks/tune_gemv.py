"""Tune the single-row GEMV's tiles (chitu/ops/triton/gemv.py) for this GPU: find the projections a
batch-1 decode step of each benchmark shape runs (by decoding with a two-layer copy of it), time every
candidate tile on each, and keep the fastest in chitu/ops/triton/gemv_configs/<GPU name>.json.

Each candidate runs in a CUDA graph, as decode runs it, over enough copies of the weight that they come
from HBM and not from L2, as a decode step's weights do.

    python benchmarks/tune_gemv.py [--out DIR] [--shapes Llama-3.1-8B Qwen3-30B-A3B ...]
"""
from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from bench_gpu import MOE_SHAPES, SHAPES, chitu_decode, chitu_engine
from chitu.ops.triton import gemv
from chitu.ops.triton.tuned_table import gpu_file, update_table


@dataclass(frozen=True)
class Projection:
    n: int
    k: int
    has_norm: bool
    has_residual: bool
    x_dtype: torch.dtype
    weight_dtype: torch.dtype
    out_dtype: torch.dtype


def projections(name: str) -> set[Projection]:
    """The GEMV launches of a batch-1 decode step of `name`, recorded on a two-layer copy of it."""
    model_type, config = MOE_SHAPES.get(name) or ("hf-llama", SHAPES[name])
    config = copy.deepcopy(config)
    config.num_hidden_layers = 2
    seen, launch = set(), gemv._launch

    def recording(x, weight, out, norm_args, tile):
        has_norm, has_residual = norm_args[5:]
        seen.add(Projection(*weight.shape, has_norm, has_residual, x.dtype, weight.dtype, x.dtype if out is None else out.dtype))
        return launch(x, weight, out, norm_args, tile)

    gemv._launch = recording
    try:
        engine = chitu_engine(config, 1, model_type)
        chitu_decode(engine, 1)
    finally:
        gemv._launch = launch
    del engine
    torch.cuda.empty_cache()
    return seen


def time_tile(projection: Projection, tile: gemv.GemvTile) -> float:
    """Microseconds of one launch, from a graph cycling over weight copies four times the L2's size."""
    p = projection
    weight_bytes = p.n * p.k * p.weight_dtype.itemsize
    copies = max(1, min(256, math.ceil(4 * torch.cuda.get_device_properties(0).L2_cache_size / weight_bytes)))
    weights = [torch.randn(p.n, p.k, dtype=p.weight_dtype, device="cuda") for _ in range(copies)]
    x, residual = (torch.randn(1, p.k, dtype=p.x_dtype, device="cuda") for _ in range(2))
    norm_weight, out = torch.ones(p.k, dtype=p.x_dtype, device="cuda"), torch.empty(1, p.n, dtype=p.out_dtype,
                                                                                    device="cuda")

    def run() -> None:
        for w in weights:
            if p.has_norm:
                gemv.norm_gemv(x, residual if p.has_residual else None, norm_weight, 1e-6, w, out=out, tile=tile)
            else:
                gemv.gemv(x, w, out=out, tile=tile)

    try:
        run()  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        return triton.testing.do_bench(graph.replay, warmup=5, rep=20, return_mode="median") * 1e3 / copies
    except triton.runtime.errors.OutOfResources:
        return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=gemv.CONFIG_DIR)
    parser.add_argument("--shapes", nargs="+", default=[*SHAPES, *MOE_SHAPES], choices=[*SHAPES, *MOE_SHAPES])
    args = parser.parse_args()
    found = set().union(*(projections(name) for name in args.shapes))
    tuned = {}
    for p in sorted(found, key=lambda p: (p.n, p.k, p.has_norm, p.has_residual, str(p.weight_dtype))):
        key = gemv.shape_key(p.n, p.k, p.has_norm, p.weight_dtype)
        if key in tuned:  # with and without a residual: tuned on the first seen
            continue
        timed = {tile: time_tile(p, tile) for tile in gemv.CANDIDATES}
        winner = min(timed, key=timed.get)
        rate = p.n * p.k * p.weight_dtype.itemsize / timed[winner] / 1e3
        print(f"{key:42} {timed[winner]:7.2f} us ({rate:6.0f} GB/s) with {winner}; "
              f"median tile {sorted(timed.values())[len(timed) // 2]:.2f} us", flush=True)
        tuned[key] = winner.__dict__
    path = gpu_file(args.out, torch.cuda.current_device())
    update_table(path, tuned)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
