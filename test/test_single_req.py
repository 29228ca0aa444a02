"""test/single_req_test.py as the manual runs it: under plain python and under torchrun, also with
two processes in a pipeline."""
import subprocess
import sys
from pathlib import Path

import pytest

import process_tree

SCRIPT = Path(__file__).with_name("single_req_test.py")
FIXED_LENGTHS = ["request.prompt_tokens_len=16", "request.max_new_tokens=4", "infer.max_seq_len=32", "infer.max_reqs=2"]


def run(launcher: list[str], overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return process_tree.run(launcher + [str(SCRIPT)] + overrides, cwd=cwd, timeout=300)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.mark.parametrize("launcher,parallel", [([sys.executable], []), (TORCHRUN + ["--nproc_per_node", "1"], []),
                                               (TORCHRUN + ["--nproc_per_node", "2"], ["infer.pp_size=2"])],
                         ids=["python", "torchrun", "torchrun-pp2"])
def test_fixed_length_run_reports_answers_and_speed(launcher, parallel, tmp_path, smollm2_path):
    result = run(launcher, FIXED_LENGTHS + parallel, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    log_files = list((tmp_path / "outputs").rglob("single_req_test.log"))
    assert log_files  # logs land in outputs/ (a run directory per process start second)
    log = "".join(f.read_text() for f in log_files)
    assert log.count("Response in rank 0") == 4  # 2 requests x 2 rounds
    assert "(4 tokens, finish_reason=length)" in log
    assert "Prefill time:" in log and "tokens/s" in log and "Request 0 prompt (16 tokens)" in log


def test_default_prompts_answer_in_words(tmp_path, smollm2_path):
    result = run([sys.executable], ["request.max_new_tokens=8", "infer.max_reqs=1", "infer.max_seq_len=128"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "What is machine learning?" in result.stderr + result.stdout


def test_bad_config_stops_with_a_message(tmp_path):
    result = run([sys.executable], ["infer.max_reqs=0"], tmp_path)
    assert result.returncode != 0
    assert "infer.max_reqs=0 must be a positive integer" in result.stderr + result.stdout
    result = run([sys.executable], ["models=Qwen3-8B"], tmp_path)
    assert result.returncode != 0 and "models.ckpt_dir is not set for model Qwen3-8B" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
