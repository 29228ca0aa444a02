"""Where a decode step's GPU time goes: kernel times inside the decode graphs of one shape (random bf16
weights; Llama-3.1-8B unless told), beside the step's wall time.

    python benchmarks/profile_decode.py [--shape Qwen3-30B-A3B] [--batches 1 64] [--rows 14] [--pdl both]

--pdl both builds the engine twice, its kernels launched plainly and then with programmatic dependent launch
(ops/triton/pdl.py), to show what that gains.
"""
import argparse
import gc

import torch
from torch.profiler import ProfilerActivity, profile

from bench_gpu import MOE_SHAPES, PROMPT, SHAPES, chitu_engine, chitu_decode, timed
from chitu.ops.triton import pdl


def kernel_table(graph: torch.cuda.CUDAGraph, rows: int, replays: int = 5) -> str:
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="Llama-3.1-8B", choices=[*SHAPES, *MOE_SHAPES])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rows", type=int, default=14, help="kernels listed per table")
    parser.add_argument("--pdl", choices=["on", "off", "both"], default="on")
    args = parser.parse_args()
    model_type, config = MOE_SHAPES.get(args.shape) or ("hf-llama", SHAPES[args.shape])
    for enabled in {"on": [True], "off": [False], "both": [False, True]}[args.pdl]:
        pdl.enabled = enabled
        profile_engine(chitu_engine(config, max(args.batches), model_type), args.batches, args.rows)
        gc.collect()
        torch.cuda.empty_cache()


def profile_engine(engine, batches: list[int], rows: int) -> None:
    chitu_decode(engine, 2)
    for batch in batches:
        rate, step = chitu_decode(engine, batch)
        graph = engine.worker.runner.graphs.graphs[engine.worker.runner.graphs.bucket_for(batch)]
        gpu = timed(graph.replay, repeat=30)
        print(f"\nPDL {'on' if pdl.enabled else 'off'}, batch {batch}: {rate:.1f} tok/s, step {step * 1e3:.2f} ms, "
              f"graph alone {gpu * 1e3:.2f} ms (host share {(step - gpu) * 1e3:.2f} ms); prompt {PROMPT}")
        print(kernel_table(graph, rows), flush=True)


if __name__ == "__main__":
    main()
