"""The service on the GPU against the offline engine, on the workload vLLM published for Qwen3-8B on one H100
(128 prompt tokens, 1024 output tokens, 1 / 64 / 128 / 256 concurrent requests):

    python benchmarks/bench_serving_gpu.py [--batches 1 64 128 256] [--engine-modes process thread]

No weights are downloaded: a Llama-3.1-8B-shaped config.json and a word-level tokenizer of its vocabulary are
written to a scratch directory, and the server starts on it with debug.skip_model_load=True (random weights).
benchmarks/benchmark_serving.py drives it (streaming /v1/completions, the server's default sampling); then the
offline engine runs the same batches in this process. Prints output tok/s of both and their ratio, for each
engine mode asked: the engine in a process of its own (serve.engine_process=true, the default) or on a thread of
the server's process.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

from bench_gpu import SHAPES, random_prompts
from bench_scheduler import build_engine
from chitu.engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
PROMPT, OUTPUT = 128, 1024
SERVING = re.compile(r"Serving model \S+ on (http://\S+:\d+)")


def write_model_dir(directory: Path) -> None:
    """config.json of the 8B shape and a tokenizer whose every id is a word: any sampled id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    config = SHAPES["Llama-3.1-8B"]
    config.max_position_embeddings = 131072
    config.save_pretrained(directory)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="w1", unk_token="w0").save_pretrained(directory)


def start_server(directory: Path, max_reqs: int, log_path: Path, engine_process: bool) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "chitu", "serve.port=0", "serve.host=127.0.0.1", "models=Llama-3.1-8B-Instruct",
               f"models.ckpt_dir={directory}", f"models.tokenizer_path={directory}", "debug.skip_model_load=True",
               f"infer.max_reqs={max_reqs}", f"infer.max_seq_len={PROMPT + OUTPUT + 64}", "infer.use_cuda_graph=True",
               f"serve.max_waiting_requests={4 * max_reqs}", f"serve.engine_process={engine_process}",
               f"hydra.run.dir={log_path.parent}"]
    log = open(log_path, "w")
    server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited:\n{log_path.read_text()[-3000:]}")
        match = SERVING.search(log_path.read_text())
        if match:
            url = match.group(1)
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    return server, url
            except requests.ConnectionError:
                pass
        time.sleep(1)
    server.kill()
    raise SystemExit(f"the server did not get ready:\n{log_path.read_text()[-3000:]}")


def service_rate(url: str, batch: int, out_dir: Path) -> dict:
    result = out_dir / f"serving_b{batch}.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "benchmark_serving.py"), "--model",
                    "Llama-3.1-8B-Instruct", "--batch-size", str(batch), "--iterations", "1", "--warmup", "1",
                    "--input-len", str(PROMPT), "--output-len", str(OUTPUT), "--base-url", url,
                    "--output-json", str(result)], check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())["summary"]


def offline_rate(engine, batch: int) -> float:
    """Output tok/s of `batch` requests from their arrival to the last token, default sampling."""
    params = SamplingParams(max_new_tokens=OUTPUT, stop_with_eos=False)
    prompts = random_prompts(batch, PROMPT, engine.model_config.vocab_size)
    torch.cuda.synchronize()
    start = time.perf_counter()
    requests_ = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return sum(len(r.output_token_ids) for r in requests_) / (time.perf_counter() - start)


def service_rates(model_dir: Path, batches: list[int], scratch: Path, engine_process: bool) -> dict:
    server, url = start_server(model_dir, max(batches), scratch / f"server_{engine_process}.log", engine_process)
    try:
        service = {b: service_rate(url, b, scratch) for b in batches}
    finally:
        server.terminate()
        server.wait(timeout=120)
    for b, s in service.items():
        print(f"engine_process={engine_process} b{b}: {s['output_throughput']:.0f} out tok/s, TTFT p50 "
              f"{s['ttft_ms']['p50']:.0f} ms, TPOT p50 {s['tpot_ms']['p50']:.2f} ms, failed {s['failed_requests']}",
              flush=True)
    return {b: s["output_throughput"] for b, s in service.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 128, 256])
    parser.add_argument("--engine-modes", nargs="+", choices=["process", "thread"], default=["process"])
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="chitu-serving-"))
    write_model_dir(scratch / "model")
    service = {mode: service_rates(scratch / "model", args.batches, scratch, mode == "process")
               for mode in args.engine_modes}
    blocks = max(args.batches) * (PROMPT + OUTPUT + 64) // 64 + 64
    engine = build_engine(max(args.batches), PROMPT + OUTPUT + 64, blocks)
    offline_rate(engine, 2)  # warm-up
    print(f"\n{'concurrency':>12}{'offline tok/s':>15}" + "".join(f"{mode + ' tok/s':>15}{'/ offline':>11}"
                                                             for mode in args.engine_modes))
    for b in args.batches:
        offline = offline_rate(engine, b)
        print(f"{b:>12}{offline:>15.0f}" + "".join(f"{service[mode][b]:>15.0f}{service[mode][b] / offline:>11.1%}"
                                                 for mode in args.engine_modes), flush=True)


if __name__ == "__main__":
    main()
