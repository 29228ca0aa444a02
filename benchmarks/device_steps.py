"""Named GPU checks and benchmarks run one after another, each under its own time limit, for a device call whose
time is short: every step's output goes line by line to `$OUT/<step>.log` (what is under $OUT comes back even when
the call is killed), a hung pytest case dumps every thread's stack after 120 s, and each step ends with a line:
name, exit code, seconds, its last line of output.

    python benchmarks/device_steps.py STEP [STEP ...]      (STEP a name below, or `all`)

Run it from the repository root on the device machine; the wheels of `.whl/` (shared/tools/device_wheels.sh) are
installed into /tmp/site first when present.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

PYTEST = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "faulthandler_timeout=120"]
BENCH = [sys.executable]

STEPS: dict[str, tuple[list[str], int]] = {
    "codes-gemv-tests": ([*PYTEST, "test/test_codes_gemv.py"], 240),
    "grouped-codes-tests": ([*PYTEST, "test/test_grouped_codes.py"], 240),
    "host-experts-tests": ([*PYTEST, "test/test_host_experts.py"], 240),
    "codes-gemv-bench": ([*BENCH, "benchmarks/bench_codes_gemv.py", "--formats", "Q4_K", "Q8_0"], 240),
    "quant-bench": ([*BENCH, "benchmarks/bench_gpu_quant.py", "--formats", "Q4_K", "Q8_0", "w8a16"], 300),
    "serving-bench": ([*BENCH, "benchmarks/bench_serving_gpu.py", "--batches", "64", "256",
                       "--engine-modes", "process", "thread"], 420),
    "hybrid-bench": ([*BENCH, "benchmarks/bench_hybrid.py", "--batches", "1", "8"], 300),
    "dense-bench": ([*BENCH, "benchmarks/bench_gpu.py", "--quick"], 300),
    "moe-bench": ([*BENCH, "benchmarks/bench_gpu.py", "--moe", "Qwen3-30B-A3B", "--quick"], 300),
    "scheduler-bench": ([*BENCH, "benchmarks/bench_scheduler.py", "--quick"], 300),
    "moe-profile": ([*BENCH, "benchmarks/profile_decode.py", "--shape", "Qwen3-30B-A3B", "--batches", "1",
                     "--pdl", "both"], 300),
    "gpu-check": ([*BENCH, "benchmarks/gpu_check.py"], 580),
}


def install_wheels() -> dict[str, str]:
    """The environment the steps run in: the repository and the carried wheels on the path."""
    site = Path("/tmp/site")
    wheels = sorted(Path(".whl").glob("*.whl"))
    if wheels and not site.exists():
        installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                    *map(str, wheels)])
        if installed.returncode:
            print("the wheels of .whl/ did not install (made for another Python?): running without them", flush=True)
    paths = [str(site), os.getcwd(), str(Path("benchmarks").resolve()), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), PYTHONUNBUFFERED="1")


def run_step(name: str, env: dict[str, str], logs: Path) -> tuple[int, float, str]:
    """(exit code, seconds, last line of output); 124 when the step ran past its limit."""
    argv, limit = STEPS[name]
    start = time.monotonic()
    with open(logs / f"{name}.log", "w", buffering=1) as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            code = 124
    lines = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
    return code, time.monotonic() - start, lines[-1][:90] if lines else ""


def main(names: list[str]) -> int:
    names = list(STEPS) if names == ["all"] else names
    unknown = [n for n in names if n not in STEPS]
    if not names or unknown:
        print(f"unknown steps {unknown}; choose from: all, {', '.join(STEPS)}", file=sys.stderr)
        return 2
    logs = Path(os.environ.get("OUT", "device_logs"))
    logs.mkdir(parents=True, exist_ok=True)
    env = install_wheels()
    results = []
    for name in names:
        results.append((name, *run_step(name, env, logs)))
        print(f"{name:22}rc {results[-1][1]:>4}  {results[-1][2]:6.0f} s  {results[-1][3]}", flush=True)
    return int(any(code for _, code, _, _ in results))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
