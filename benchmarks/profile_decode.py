"""Where a decode step's GPU time goes: kernel times inside the batch-1 and batch-64 decode graphs of
the Llama-3.1-8B shape (random bf16 weights), beside the step's wall time.

    python benchmarks/profile_decode.py
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_gpu import PROMPT, SHAPES, chitu_engine, chitu_decode, timed


def kernel_table(graph: torch.cuda.CUDAGraph, replays: int = 5) -> str:
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)


def main() -> None:
    engine = chitu_engine(SHAPES["Llama-3.1-8B"], 64)
    chitu_decode(engine, 2)
    for batch in (1, 64):
        rate, step = chitu_decode(engine, batch)
        graph = engine.worker.runner.graphs.graphs[engine.worker.runner.graphs.bucket_for(batch)]
        gpu = timed(graph.replay, repeat=30)
        print(f"\nbatch {batch}: {rate:.1f} tok/s, step {step * 1e3:.2f} ms, graph alone {gpu * 1e3:.2f} ms "
              f"(host share {(step - gpu) * 1e3:.2f} ms); prompt {PROMPT}")
        print(kernel_table(graph), flush=True)


if __name__ == "__main__":
    main()
