"""Pipeline parallelism on the CPU: 8 concurrent requests with pp_size=2, with and without
micro-batches (the scheduler.pp_config knobs), against one process and tp_size=2. Each run is
test/single_req_test.py under torchrun; its second (warm) round is reported.

Micro-batches let stage 0 compute one batch while stage 1 computes another. That pays where a step
is compute-bound (prefill); a memory-bound decode step costs a stage about the same for 4 requests as
for 8, so splitting the decode batch buys overlap with extra weight reads.

    python benchmarks/bench_pipeline.py [--new-tokens 64] [--prompt-len 128] [extra overrides...]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "test" / "single_req_test.py"
REQUESTS = 8
WHOLE_PREFILL = ["scheduler.pp_config.prefill_num_tasks_divided_by_pp=False",
                 f"scheduler.pp_config.prefill_num_tasks={REQUESTS}"]
SPLIT_DECODE = ["scheduler.pp_config.enforce_decode_num_tasks_max=False",
                f"scheduler.pp_config.decode_num_tasks={REQUESTS // 2}"]
RUNS = {
    "1 process (2 threads)": (1, []),
    "pp=2, no micro-batches (prefill 8, decode 8)": (2, ["infer.pp_size=2", *WHOLE_PREFILL]),
    "pp=2, default knobs (prefill 4+4, decode 8)": (2, ["infer.pp_size=2"]),
    "pp=2, prefill 4+4, decode 4+4": (2, ["infer.pp_size=2", *SPLIT_DECODE]),
    "tp=2": (2, ["infer.tp_size=2"]),
}


def run(nproc: int, overrides: list[str]) -> dict[str, float]:
    command = ["torchrun", "--standalone", "--nproc_per_node", str(nproc), str(SCRIPT), *overrides]
    env = None if nproc > 1 else {**__import__("os").environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    log = proc.stdout + proc.stderr
    decode = re.findall(r"Decode: (\d+) tokens in ([\d.]+) s", log)[-1]
    prefill = re.findall(r"Prefill time: ([\d.]+) s", log)[-1]
    total = re.findall(r"Time cost ([\d.]+) s", log)[-1]
    return {"decode_tok_s": int(decode[0]) / float(decode[1]), "prefill_s": float(prefill), "total_s": float(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    args, extra = parser.parse_known_args()
    common = [f"request.prompt_tokens_len={args.prompt_len}", f"request.max_new_tokens={args.new_tokens}",
              f"infer.max_seq_len={args.prompt_len + args.new_tokens}", f"infer.max_reqs={REQUESTS}", *extra]
    output_tokens = REQUESTS * args.new_tokens
    print(f"{'run':48}{'decode tok/s':>14}{'prefill s':>11}{'total s':>9}{'output tok/s':>14}")
    for name, (nproc, overrides) in RUNS.items():
        r = run(nproc, common + overrides)
        print(f"{name:48}{r['decode_tok_s']:>14.1f}{r['prefill_s']:>11.2f}{r['total_s']:>9.2f}"
              f"{output_tokens / r['total_s']:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
