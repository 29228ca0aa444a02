"""Serving benchmark: latency and throughput of a running Chitu (or any OpenAI-compatible) server.

    python benchmarks/benchmark_serving.py --model SmolLM2-135M-Instruct --batch-size 8 --iterations 10 \
        --input-len 128 --output-len 1024 --warmup 3 --base-url http://localhost:21002

Each iteration sends --batch-size concurrent streaming requests and waits for all of them. Every
prompt is exactly --input-len random token ids (sent as a token list to /v1/completions, so no
tokenizer is needed here and no two prompts share a prefix), every answer exactly --output-len
tokens (`stop_with_eos: false`), with the server's default sampling parameters. The requests are spread over
--client-processes processes (by default one per 32 requests, at most one per CPU): one Python process reading a
few hundred streams, a thread each, spends ~50 µs per token on the GIL and JSON, which is what a fast server
spends, and would measure the client.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import random
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import requests

# Random prompt tokens come from this id range: inside the vocabulary of every model family Chitu
# serves, and clear of the special tokens at either end.
PROMPT_TOKEN_RANGE = (1000, 30000)
PERCENTILES = (50, 90, 99)
REQUESTS_PER_CLIENT_PROCESS = 32


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0  # seconds from sending to the first token
    latency: float = 0.0  # seconds from sending to the last token
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the served model name (see GET /v1/models)")
    parser.add_argument("--batch-size", type=int, default=1, help="concurrent requests per iteration")
    parser.add_argument("--iterations", type=int, default=10, help="measured iterations")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--warmup", type=int, default=1, help="iterations run first and not measured")
    parser.add_argument("--base-url", default="http://localhost:21002", help="server URL, with http:// or https://")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer <key>'")
    parser.add_argument("--output-json", default="outputs/benchmark_serving.json",
                        help="where to save the results (folders made as needed)")
    parser.add_argument("--plot", metavar="FILE", help="save a latency/throughput chart (needs matplotlib)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    parser.add_argument("--client-processes", type=int, default=0,
                        help=f"processes the concurrent requests are spread over (0: one per "
                             f"{REQUESTS_PER_CLIENT_PROCESS} requests, at most one per CPU)")
    args = parser.parse_args(argv)
    if not args.base_url.startswith(("http://", "https://")):
        parser.error(f"--base-url must start with http:// or https://, got '{args.base_url}' "
                     f"(for example --base-url http://{args.base_url})")
    for name in ("batch_size", "iterations", "input_len", "output_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.client_processes < 0:
        parser.error("--client-processes must be 0 (automatic) or more")
    if args.client_processes == 0:
        args.client_processes = min(math.ceil(args.batch_size / REQUESTS_PER_CLIENT_PROCESS), os.cpu_count() or 1)
    args.client_processes = min(args.client_processes, args.batch_size)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'chitu[plot]' (or pip install matplotlib)")
    return args


def send_request(args: argparse.Namespace, prompt: list[int]) -> RequestResult:
    payload = {"model": args.model, "prompt": prompt, "max_tokens": args.output_len, "stop_with_eos": False,
               "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    start = time.perf_counter()
    ttft = None
    usage = None
    try:
        with requests.post(f"{args.base_url.rstrip('/')}/v1/completions", json=payload, headers=headers,
                           stream=True, timeout=args.timeout) as response:
            if response.status_code != 200:
                return RequestResult(False, error=f"HTTP {response.status_code}: {_error_message(response)}")
            # chunk_size=None: lines as they arrive, so the first token is timed when it comes
            for line in response.iter_lines(chunk_size=None):
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[len(b"data: "):])
                if "error" in chunk:
                    return RequestResult(False, error=chunk["error"]["message"])
                if chunk["choices"] and ttft is None:
                    ttft = time.perf_counter() - start
                usage = chunk.get("usage") or usage
    except requests.RequestException as e:
        return RequestResult(False, error=str(e))
    latency = time.perf_counter() - start
    if usage is None or ttft is None:
        return RequestResult(False, error="the stream ended without tokens or usage")
    return RequestResult(True, ttft, latency, usage["prompt_tokens"], usage["completion_tokens"])


def _error_message(response: requests.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def run_iteration(args: argparse.Namespace, rng: random.Random,
                  clients: Executor | None) -> tuple[float, list[RequestResult]]:
    """All --batch-size requests at once, on this process's threads or spread over the client processes."""
    prompts = [[rng.randrange(*PROMPT_TOKEN_RANGE) for _ in range(args.input_len)] for _ in range(args.batch_size)]
    start = time.perf_counter()
    if clients is None:
        results = send_concurrently(args, prompts)
    else:
        shares = [prompts[i::args.client_processes] for i in range(args.client_processes)]
        per_share = list(clients.map(functools.partial(send_concurrently, args), shares))
        results = [result for share in per_share for result in share]
    return time.perf_counter() - start, results


def send_concurrently(args: argparse.Namespace, prompts: list[list[int]]) -> list[RequestResult]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(functools.partial(send_request, args), prompts))


def summarize(args: argparse.Namespace, durations: list[float], results: list[RequestResult]) -> dict:
    ok = [r for r in results if r.ok]
    total_time = sum(durations)
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "successful_requests": len(ok),
        "failed_requests": len(results) - len(ok),
        "duration_s": total_time,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / total_time,
        "output_throughput": output_tokens / total_time,
        "total_token_throughput": (input_tokens + output_tokens) / total_time,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
        "e2e_latency_ms": _stats([r.latency for r in ok]),
        "iteration_output_throughput": [sum(r.output_tokens for r in batch if r.ok) / d
                                        for d, batch in zip(durations, _batches(results, args.batch_size))],
    }


def _batches(results: list[RequestResult], size: int) -> list[list[RequestResult]]:
    return [results[i:i + size] for i in range(0, len(results), size)]


def _stats(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = np.array(seconds) * 1000
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}


def print_table(args: argparse.Namespace, summary: dict) -> None:
    print("=" * 20 + " Serving Benchmark Result " + "=" * 20)
    rows = [("Model", args.model), ("Batch size (concurrent requests)", args.batch_size),
            ("Client processes", args.client_processes),
            ("Iterations (warm-up)", f"{args.iterations} ({args.warmup})"),
            ("Input / output tokens per request", f"{args.input_len} / {args.output_len}"),
            ("Successful / failed requests", f"{summary['successful_requests']} / {summary['failed_requests']}"),
            ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
            ("Total input / generated tokens", f"{summary['total_input_tokens']} / {summary['total_output_tokens']}"),
            ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}")]
    for name, value in rows:
        print(f"{name:<36}{value:>30}")
    print("-" * 66)
    print(f"{'Latency (ms)':<18}" + "".join(f"{h:>12}" for h in ("mean", *(f"p{p}" for p in PERCENTILES))))
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("End-to-end", "e2e_latency_ms")):
        stats = summary[key]
        cells = [stats.get(k) for k in ("mean", *(f"p{p}" for p in PERCENTILES))]
        print(f"{name:<18}" + "".join(f"{c:>12.2f}" if c is not None else f"{'-':>12}" for c in cells))
    print("=" * 66)


def plot(path: str, results: list[RequestResult], summary: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, (latency_ax, throughput_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    latency_ax.boxplot([[r.ttft * 1000 for r in ok], [r.tpot * 1000 for r in ok if r.tpot is not None],
                        [r.latency * 1000 for r in ok]], showfliers=True)
    latency_ax.set_xticks([1, 2, 3], ["TTFT", "TPOT", "End-to-end"])
    latency_ax.set_yscale("log")
    latency_ax.set_ylabel("ms")
    latency_ax.set_title("Latency per request")
    throughputs = summary["iteration_output_throughput"]
    throughput_ax.bar(range(1, len(throughputs) + 1), throughputs)
    throughput_ax.set_xlabel("iteration")
    throughput_ax.set_ylabel("output tokens/s")
    throughput_ax.set_title(f"Output throughput (mean {summary['output_throughput']:.1f} tok/s)")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client_processes == 1:
        return run(args, None)
    with ProcessPoolExecutor(args.client_processes, mp_context=multiprocessing.get_context("spawn")) as clients:
        return run(args, clients)


def run(args: argparse.Namespace, clients: Executor | None) -> int:
    rng = random.Random(args.seed)
    for i in range(args.warmup):
        _, warmup_results = run_iteration(args, rng, clients)
        failed = [r for r in warmup_results if not r.ok]
        if failed:
            print(f"warm-up iteration {i} failed: {failed[0].error}", file=sys.stderr)
            return 1
    durations, results = [], []
    for _ in range(args.iterations):
        duration, batch = run_iteration(args, rng, clients)
        durations.append(duration)
        results.extend(batch)
    summary = summarize(args, durations, results)
    print_table(args, summary)
    errors = [r.error for r in results if not r.ok]
    if errors:
        print(f"{len(errors)} request(s) failed, the first with: {errors[0]}", file=sys.stderr)
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump({"args": vars(args), "summary": summary, "requests": [asdict(r) for r in results]}, f, indent=2)
    print(f"Results saved to {args.output_json}")
    if args.plot:
        plot(args.plot, results, summary)
        print(f"Chart saved to {args.plot}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
