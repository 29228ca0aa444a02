"""Every Triton kernel on the model families' paths, checked for logic on the CPU: triton_interpreted_cases.py under
TRITON_INTERPRET=1, in a process of its own (triton reads the variable as it defines the kernels)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from process_tree import ProcessTree

pytest.importorskip("triton")

CASES = Path(__file__).with_name("triton_interpreted_cases.py")


def test_model_families_through_the_interpreted_triton_kernels_match_transformers():
    tree = ProcessTree([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                       cwd=CASES.parent.parent, env={**os.environ, "TRITON_INTERPRET": "1"},
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = tree.communicate(timeout=1800)
    finally:
        tree.stop_tree()
    assert tree.returncode == 0, output[-6000:]
    assert " passed" in output and "skipped" not in output, output[-2000:]
