"""Processes the tests start, each with everything it starts in turn: when the test ends, passed or
failed, the whole tree is stopped (SIGTERM, then SIGKILL after a grace period), so no server or torchrun
rank outlives its test.

The command runs in a session (process group) of its own. torchrun starts every rank in yet another
session, so the tree is also found by a tag in the environment that every descendant inherits; it
reaches ranks whose torchrun has died too. Also: a port for rendezvous that must be named in advance.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import uuid

import psutil
import pytest

TAG = "PYTEST_PROCESS_TREE"  # not CHITU_*: the launchers would forward it, and their dry runs print it
GRACE_S = 10.0


class ProcessTree(subprocess.Popen):
    """`subprocess.Popen` in a new session; `with` (or `stop_tree`) stops every process of the tree."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None, **popen_kwargs):
        self.tag = uuid.uuid4().hex
        super().__init__(command, env={**(os.environ if env is None else env), TAG: self.tag},
                         start_new_session=True, **popen_kwargs)

    def __exit__(self, *exc_info) -> None:
        self.stop_tree()
        super().__exit__(*exc_info)

    def members(self) -> list[psutil.Process]:
        """The live processes of the tree: in this one's process group, or carrying its tag."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.status() != psutil.STATUS_ZOMBIE and (
                        os.getpgid(process.pid) == self.pid or process.environ().get(TAG) == self.tag):
                    found.append(process)
            except (psutil.Error, OSError):  # gone meanwhile, or not ours to read
                continue
        return found

    def stop_tree(self, grace_s: float = GRACE_S) -> None:
        """SIGTERM to every process of the tree, SIGKILL to those left after `grace_s`; reaps this one."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, GRACE_S)):
            members = self.members()
            for process in members:
                try:
                    process.send_signal(sig)
                except psutil.Error:
                    pass
            deadline = time.monotonic() + wait_s
            while members and time.monotonic() < deadline:
                time.sleep(0.1)
                self.poll()
                members = self.members()
            if not members:
                break
        self.wait()


def run(command: list[str], timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, timeout=timeout)` as a ProcessTree: whatever
    is left of it afterwards is stopped, and running past `timeout` fails the test with its output."""
    with ProcessTree(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.stop_tree()
            stdout, stderr = process.communicate()
            pytest.fail(f"{command} ran past {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def unused_port() -> int:
    """A TCP port for a rendezvous that must be named in advance (several torchrun nodes): chosen at random
    below the kernel's ephemeral range, which the kernel never hands out by itself, and free right now."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_start = int(f.read().split()[0])
    below = range(max(1024, ephemeral_start - 10000), ephemeral_start)
    for port in random.SystemRandom().sample(below, len(below)):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no unused TCP port below the ephemeral range")

