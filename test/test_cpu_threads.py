"""CPU threads: the physical cores this process may use (this machine's real sysfs), shared among the
ranks torchrun starts on the node; infer.num_threads overrides."""
import os
import shutil
import sys

import pytest
import torch

import process_tree
from chitu.config import compose_config
from chitu.platform import configure_cpu_threads, physical_cores

CPU = torch.device("cpu")
# one write(2) per rank: two ranks' print() pieces interleave on the shared stdout when it is unbuffered
PRINT_THREADS = """
import os, sys, torch
from chitu.config import compose_config
from chitu.platform import configure_cpu_threads
configure_cpu_threads(compose_config(sys.argv[1:]), torch.device("cpu"))
os.write(1, f"threads {torch.get_num_threads()}\\n".encode())
"""


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def available_cores() -> int:
    return physical_cores(os.sched_getaffinity(0))


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="needs lscpu")
def test_physical_cores_agree_with_lscpu():
    listing = process_tree.run(["lscpu", "--parse=CPU,CORE,SOCKET"], timeout=30).stdout
    rows = [line.split(",") for line in listing.splitlines() if not line.startswith("#")]
    affinity = os.sched_getaffinity(0)
    expected = {(socket, core) for cpu, core, socket in rows if int(cpu) in affinity}
    assert available_cores() == len(expected)
    assert 1 <= available_cores() <= len(affinity)


def test_one_logical_cpu_is_one_core():
    for cpu in os.sched_getaffinity(0):
        assert physical_cores({cpu}) == 1


def test_one_process_takes_every_available_core(restore_threads, monkeypatch, caplog):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    caplog.set_level("INFO", logger="chitu.platform")
    configure_cpu_threads(compose_config([]), CPU)
    assert torch.get_num_threads() == available_cores()
    assert f"CPU threads: {available_cores()} ({available_cores()} physical core(s) available / 1 local rank(s)" \
        in caplog.text
    configure_cpu_threads(compose_config(["infer.num_threads=3"]), CPU)
    assert torch.get_num_threads() == 3 and "CPU threads: 3 (infer.num_threads)" in caplog.text


def test_torchrun_ranks_share_the_cores(tmp_path):
    script = tmp_path / "print_threads.py"
    script.write_text(PRINT_THREADS)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = process_tree.run(torchrun, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    half = max(1, available_cores() // 2)
    assert result.stdout.split("\n").count(f"threads {half}") == 2, result.stdout
    result = process_tree.run([*torchrun, "infer.num_threads=2"], timeout=120)
    assert result.stdout.split("\n").count("threads 2") == 2, result.stdout + result.stderr[-3000:]
