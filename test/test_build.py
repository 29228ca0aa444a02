"""The build refuses the manual's switches it does not build, by name, before building anything."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("variable, message", [
    ("CHITU_ASCEND_BUILD", "CHITU_ASCEND_BUILD=1: Huawei Ascend NPUs are not supported by this build of Chitu"),
    ("CHITU_HYGON_BUILD", "CHITU_HYGON_BUILD=1: Hygon DCUs are not supported by this build of Chitu"),
    ("CHITU_MUXI_BUILD", "CHITU_MUXI_BUILD=1: MetaX (Muxi) GPUs are not supported by this build of Chitu"),
    ("CHITU_WITH_CYTHON", "CHITU_WITH_CYTHON=1: the Cython build is not in this version of Chitu yet"),
])
def test_a_switch_this_build_lacks_stops_the_build_with_its_name(variable, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                             "--disable-pip-version-check", "-w", str(tmp_path), str(REPO)],
                            capture_output=True, text=True, env={**os.environ, variable: "1"}, timeout=600)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not list(tmp_path.glob("*.whl"))


def test_build_for_dist_false_makes_a_pure_wheel_that_runs_from_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run(["bash", str(REPO / "script" / "build_for_dist.sh"), "false"], capture_output=True,
                           text=True, env={**os.environ, "DIST_DIR": str(dist)}, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = dist.glob("chitu-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    # the venv sees this machine's torch and the other dependencies; chitu itself comes only from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", str(wheel)],
                   check=True, timeout=600)
    where = subprocess.run([python, "-c", "import chitu; print(chitu.__file__)"], capture_output=True, text=True,
                           cwd=tmp_path, check=True).stdout.strip()
    assert where.startswith(str(tmp_path / "venv"))
    help_text = subprocess.run([python, "-m", "chitu", "--help"], capture_output=True, text=True, cwd=tmp_path,
                               timeout=300)
    assert help_text.returncode == 0, help_text.stderr
    assert "  models.name = SmolLM2-135M-Instruct" in help_text.stdout


def test_build_for_dist_wants_true_or_false():
    result = subprocess.run(["bash", str(REPO / "script" / "build_for_dist.sh"), "maybe"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr
