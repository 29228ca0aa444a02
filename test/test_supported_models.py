"""script/generate_supported_models_docs.py: --print lists every model; SUPPORTED_MODELS.md is in sync."""
import subprocess
import sys
from pathlib import Path

import chitu

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "script" / "generate_supported_models_docs.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_print_lists_every_model_yaml():
    result = run("--print")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    # the installed package's configs (a source checkout's, or those a wheel installed)
    assert listed == sorted(path.stem for path in (Path(chitu.__file__).parent / "config" / "models").glob("*.yaml"))
    assert "SmolLM2-135M-Instruct" in listed


def test_supported_models_md_is_up_to_date():
    result = run("--check")
    assert result.returncode == 0, f"{result.stderr}(regenerate it: python3 script/generate_supported_models_docs.py)"
