#!/usr/bin/env bash
# Build Chitu's wheel into dist/, as the manual's `./script/build_for_dist.sh <with_cython>` does.
#   bash script/build_for_dist.sh false   a pure-Python wheel (py3-none-any)
#   bash script/build_for_dist.sh true    the Cython build (CHITU_WITH_CYTHON=1)
# Then: pip install dist/chitu-*.whl [--no-deps]. DIST_DIR=<dir> puts the wheel there instead of dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    true) export CHITU_WITH_CYTHON=1 ;;
    false) export CHITU_WITH_CYTHON=0 ;;
    *) echo "usage: $0 <true|false>   (true: compile with Cython)" >&2; exit 2 ;;
esac
DIST_DIR="${DIST_DIR:-dist}"
mkdir -p "$DIST_DIR"
python -m pip wheel --no-build-isolation --no-deps --disable-pip-version-check -w "$DIST_DIR" .
ls "$DIST_DIR"/chitu-*.whl
