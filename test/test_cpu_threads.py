"""CPU threads: the physical cores this process may use (this machine's real sysfs), shared among the
ranks torchrun starts on the node; infer.num_threads overrides. NUMA binding: which node's CPUs a local rank
takes (a sysfs tree written here, and this machine's own)."""
import os
import shutil
import sys

import pytest
import torch

import process_tree
from chitu.config import compose_config
from chitu.config.schema import ConfigError
from chitu.platform import configure_cpu, numa_binding, numa_nodes, parse_cpulist, physical_cores

CPU = torch.device("cpu")
# one write(2) per rank: two ranks' print() pieces interleave on the shared stdout when it is unbuffered
PRINT_THREADS = """
import os, sys, torch
from chitu.config import compose_config
from chitu.platform import configure_cpu
configure_cpu(compose_config(sys.argv[1:]), torch.device("cpu"))
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
    configure_cpu(compose_config([]), CPU)
    assert torch.get_num_threads() == available_cores()
    assert f"CPU threads: {available_cores()} ({available_cores()} physical core(s) available / 1 local rank(s)" \
        in caplog.text
    configure_cpu(compose_config(["infer.num_threads=3"]), CPU)
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


def test_cpulists_parse_as_sysfs_writes_them():
    assert parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpulist("\n") == set()


def test_numa_nodes_are_read_in_node_order_and_cpuless_nodes_skipped(tmp_path):
    for node, cpus in (("node0", "0-3"), ("node1", "4-7"), ("node2", ""), ("node10", "8,9")):
        (tmp_path / node).mkdir()
        (tmp_path / node / "cpulist").write_text(cpus + "\n")
    (tmp_path / "possible").write_text("0-10\n")  # not a node
    assert numa_nodes(tmp_path) == [set(range(4)), set(range(4, 8)), {8, 9}]
    assert numa_nodes(tmp_path / "missing") == []


def test_local_ranks_take_the_nodes_in_turn_within_what_they_may_use():
    nodes = [set(range(4)), set(range(4, 8))]
    allowed = set(range(8))
    assert numa_binding(0, 3, nodes, allowed) == (set(range(4)), 2)  # ranks 0 and 2 share node 0
    assert numa_binding(1, 3, nodes, allowed) == (set(range(4, 8)), 1)
    assert numa_binding(2, 3, nodes, allowed) == (set(range(4)), 2)
    assert numa_binding(1, 2, nodes, {0, 1, 5}) == ({5}, 1)
    assert numa_binding(1, 2, nodes, {0, 1}) == ({0, 1}, 2)  # none of its node allowed: it keeps what it had


def test_numa_binding_here_keeps_this_machines_node_and_logical_cores_count_threads(restore_threads, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    before = os.sched_getaffinity(0)
    nodes = numa_nodes()
    if not nodes:
        with pytest.raises(ConfigError, match="shows no NUMA topology"):
            configure_cpu(compose_config(["infer.bind_process_to_cpu=numa"]), CPU)
        return
    try:
        configure_cpu(compose_config(["infer.bind_process_to_cpu=numa", "infer.bind_thread_to_cpu=logical_core"]), CPU)
        assert os.sched_getaffinity(0) == (nodes[0] & before or before)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    finally:
        os.sched_setaffinity(0, before)
