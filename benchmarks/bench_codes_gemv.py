"""Batch-1 GEMV over GGUF codes on the GPU: the integer kernel (ops/triton/codes_gemv.py) against the float one
(ops/triton/grouped_codes.py) and bf16, per Llama-3.1-8B layer shape, as a share of the copy rate measured here.

    python benchmarks/bench_codes_gemv.py [--formats Q4_K Q4_0 Q8_0]

First the integer kernel against its float32 reference on awkward sizes (the check), then the timings: each cell is
one CUDA graph of calls on distinct copies of the weights (together > 4x the L2, so they stream from memory),
divided by the calls, with the bytes read per second as a share of the copy rate.
"""
from __future__ import annotations

import argparse

import torch

from bench_gpu import copy_bandwidth
from bench_gpu_quant import LAYER_SHAPES, random_codes
from chitu.ops.triton import codes_gemv, grouped_codes

STREAMED_BYTES = 256 * 2**20


def check(formats: list[str]) -> None:
    worst = 0.0
    for fmt in formats:
        for n, k in [(1, 256), (37, 768), (300, 2304), (4099, 4096)]:
            w = random_codes(fmt, n, k)
            for dtype in (torch.bfloat16, torch.float32):  # float16: test/test_codes_gemv.py
                x = torch.randn(1, k, device="cuda", dtype=dtype)
                expected = codes_gemv.reference(x, w)
                for tile in codes_gemv.CONFIGS:
                    got = codes_gemv.codes_gemv(x, w, tile=dict(tile.kwargs, num_warps=tile.num_warps)).float()
                    error = ((got - expected).abs().max() / expected.abs().max()).item()
                    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
                    assert error < tolerance, (fmt, n, k, dtype, tile, error)
                    if dtype == torch.float32:
                        worst = max(worst, error)
    print(f"check: integer GEMV = reference for {formats} x 4 shapes x 2 dtypes x {len(codes_gemv.CONFIGS)} tiles "
          f"(fp32 worst relative error {worst:.1e})")


def graph_seconds(calls: list) -> float:
    """Seconds per call of `calls` replayed as one CUDA graph (median of 10 replays)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for call in calls[:3]:
            call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return sorted(times)[5]


def timings(formats: list[str], ceiling: float) -> None:
    print(f"\n{'shape':24}{'format':>7}{'bf16':>16}{'float GEMV':>16}{'integer GEMV':>16}  best tile")
    for name, (n, k) in LAYER_SHAPES.items():
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        copies = max(2, min(64, STREAMED_BYTES // (n * k * 2)))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        bf16 = graph_seconds([lambda w=w: x @ w.T for w in dense])
        del dense
        for fmt in formats:
            codes = [random_codes(fmt, n, k) for _ in range(max(2, min(64, STREAMED_BYTES // (n * k // 2))))]
            size = codes[0].stored_bytes
            old = graph_seconds([lambda w=w: grouped_codes.float_gemv(x, w) for w in codes])
            tiles = {f"{t.kwargs['BLOCK_N']}x{t.kwargs['GROUPS']}/{t.num_warps}w":
                     graph_seconds([lambda w=w, t=t: codes_gemv.codes_gemv(x, w, dict(t.kwargs, num_warps=t.num_warps))
                                    for w in codes]) for t in codes_gemv.CONFIGS}
            best = min(tiles, key=tiles.get)
            cells = [f"{bf16 * 1e6:6.1f}us {n * k * 2 / bf16 / ceiling:4.0%}"] + [
                f"{s * 1e6:6.1f}us {size / s / ceiling:4.0%}" for s in (old, tiles[best])]
            print(f"{name + f' {n}x{k}':24}{fmt:>7}" + "".join(f"{c:>16}" for c in cells) + f"  {best}", flush=True)
            del codes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", nargs="*", default=["Q4_K", "Q4_0", "Q8_0"])
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    check(args.formats)
    ceiling = copy_bandwidth()
    print(f"copy rate {ceiling / 1e12:.2f} TB/s")
    timings(args.formats, ceiling)


if __name__ == "__main__":
    main()
