"""The wheels `script/build_for_dist.sh` builds (pure, and compiled with Cython) install into a fresh venv and serve
the default model from there; the build refuses by name the manual's switches for platforms it does not build."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import openai
import pytest

from server_process import ServerProcess

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("variable, message", [
    ("CHITU_ASCEND_BUILD", "CHITU_ASCEND_BUILD=1: Huawei Ascend NPUs are not supported by this build of Chitu"),
    ("CHITU_HYGON_BUILD", "CHITU_HYGON_BUILD=1: Hygon DCUs are not supported by this build of Chitu"),
    ("CHITU_MUXI_BUILD", "CHITU_MUXI_BUILD=1: MetaX (Muxi) GPUs are not supported by this build of Chitu"),
])
def test_a_switch_this_build_lacks_stops_the_build_with_its_name(variable, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                             "--disable-pip-version-check", "-w", str(tmp_path), str(REPO)],
                            capture_output=True, text=True, env={**os.environ, variable: "1"}, timeout=600)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not list(tmp_path.glob("*.whl"))


def build_wheel(tmp_path: Path, with_cython: str, **env: str) -> Path:
    dist = tmp_path / "dist"
    build = subprocess.run(["bash", str(REPO / "script" / "build_for_dist.sh"), with_cython], capture_output=True,
                           text=True, env={**os.environ, "DIST_DIR": str(dist), **env}, timeout=1800)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = dist.glob("chitu-*.whl")
    return wheel


def fresh_venv_with(wheel: Path, tmp_path: Path) -> str:
    """The venv's python: this machine's torch and the other dependencies, chitu only from the wheel."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", str(wheel)],
                   check=True, timeout=600)
    where = subprocess.run([python, "-c", "import chitu; print(chitu.__file__)"], capture_output=True, text=True,
                           cwd=tmp_path, check=True).stdout.strip()
    assert where.startswith(str(tmp_path / "venv"))
    return python


def assert_serves_the_default_model(python: str, tmp_path: Path) -> None:
    """`python -m chitu --help`, then the service on the default model answering one chat request, from outside
    the repository."""
    help_text = subprocess.run([python, "-m", "chitu", "--help"], capture_output=True, text=True, cwd=tmp_path,
                               timeout=300)
    assert help_text.returncode == 0, help_text.stderr
    assert "  models.name = SmolLM2-135M-Instruct" in help_text.stdout
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with ServerProcess(run_dir, "infer.max_seq_len=128", launcher=(python,), cwd=tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "Say hi"}])
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
        assert server.stop() == 0


def test_build_for_dist_false_makes_a_pure_wheel_that_serves_from_a_fresh_venv(tmp_path):
    wheel = build_wheel(tmp_path, "false")
    assert wheel.name.endswith("-py3-none-any.whl")
    assert_serves_the_default_model(fresh_venv_with(wheel, tmp_path), tmp_path)


def test_build_for_dist_true_compiles_the_modules_with_cython_and_serves_from_a_fresh_venv(tmp_path):
    """A platform wheel of extension modules without their sources; what must stay Python (package __init__s,
    __main__, the Triton kernels, the API's pydantic models) stays. Unoptimised C here, for the build's time."""
    wheel = build_wheel(tmp_path, "true", CFLAGS="-O0")
    assert wheel.name.endswith(f"-cp{sys.version_info.major}{sys.version_info.minor}-linux_x86_64.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    compiled = {name.split(".")[0] for name in names if name.endswith(".so")}
    assert {"chitu/engine/scheduler", "chitu/serve/app", "chitu/models/registry", "chitu/quant/fp8_block"} <= compiled
    assert not {f"{module}.py" for module in compiled} & names
    assert {"chitu/__main__.py", "chitu/ops/triton/gemv.py", "chitu/serve/protocol.py",
            "chitu/ops/cpu/vec.h"} <= names
    python = fresh_venv_with(wheel, tmp_path)
    where = subprocess.run([python, "-c", "import chitu.engine.scheduler as m; print(m.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert where.strip().endswith(".so")
    assert_serves_the_default_model(python, tmp_path)
    assert not list((REPO / "chitu").rglob("*.so")), "the build leaves the source tree as it was"


def test_an_editable_install_says_it_ignores_cython(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], check=True)
    result = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-m", "pip", "install", "-v", "--no-deps",
                             "--no-build-isolation", "--disable-pip-version-check", "-e", str(REPO)],
                            capture_output=True, text=True, env={**os.environ, "CHITU_WITH_CYTHON": "1"}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CHITU_WITH_CYTHON=1 is ignored for an editable install" in result.stdout + result.stderr


def test_build_for_dist_wants_true_or_false():
    result = subprocess.run(["bash", str(REPO / "script" / "build_for_dist.sh"), "maybe"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr
