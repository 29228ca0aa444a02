"""python -m chitu.torchrun: torchrun's launcher, with one line instead of its tracebacks when ranks fail
(a configuration error on every rank) or the service is stopped by SIGTERM."""
from __future__ import annotations

import signal
import subprocess
import sys

import openai

from process_tree import ProcessTree
from server_process import ServerProcess
from test_serve_parallel import ENGINE, QUESTION

QUIET_TORCHRUN = (sys.executable, "-m", "chitu.torchrun", "--standalone", "--nproc_per_node", "2")


def test_config_error_on_every_rank_is_one_line_each_and_no_traceback():
    tree = ProcessTree([*QUIET_TORCHRUN, "-m", "chitu", "infer.max_req=4"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = tree.communicate(timeout=300)
    finally:
        tree.stop_tree()
    assert tree.returncode == 1, output
    assert "Traceback" not in output, output
    assert output.count("did you mean infer.max_reqs?") == 2, output
    assert "chitu.torchrun: rank 0 stopped with exit code 1" in output or \
        "chitu.torchrun: rank 1 stopped with exit code 1" in output, output


def test_sigterm_stops_the_tensor_parallel_service_with_exit_code_0(smollm2_path, tmp_path):
    with ServerProcess(tmp_path, *ENGINE, "dtype=float32", "infer.tp_size=2", launcher=QUIET_TORCHRUN) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=8,
                                                temperature=0)
        assert answer.choices[0].message.content
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=90) == 0, server.log()
        log = server.log()
        assert "Chitu service stopped" in log and "Traceback" not in log, log
