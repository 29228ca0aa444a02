"""The GPU checks in one call: Triton kernels against their torch references, every model family in
bf16 on CUDA against transformers, CUDA-graph decode against eager, an MoE model under torchrun on one
GPU, fp8 block checkpoints kept in fp8. Prints a summary table.

    python benchmarks/gpu_check.py [pytest arguments, e.g. -k "not narrower"]
"""
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from tempfile import TemporaryDirectory

import pytest

SUITES = ["test/test_triton_ops.py", "test/test_models.py", "test/test_cuda_graph.py", "test/test_sampler.py",
          "test/test_distributed.py::test_moe_under_torchrun_on_one_gpu_matches_plain_python",
          "test/test_grouped_codes.py", "test/test_codes_gemv.py", "test/test_host_experts.py", "test/test_quant_fp8_block.py"]


def main() -> int:
    with TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        code = pytest.main(["-q", "-p", "no:cacheprovider", f"--junitxml={report}", *SUITES, *sys.argv[1:]])
        rows = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            suite = case.get("classname", "").split(".")[1] if "." in case.get("classname", "") else "?"
            outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else \
                "skipped" if case.find("skipped") is not None else "passed"
            counts = rows.setdefault(suite, {"passed": 0, "failed": 0, "skipped": 0})
            counts[outcome] += 1
    print(f"\n{'suite':24}{'passed':>8}{'failed':>8}{'skipped':>9}")
    for suite, counts in sorted(rows.items()):
        print(f"{suite:24}{counts['passed']:>8}{counts['failed']:>8}{counts['skipped']:>9}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
