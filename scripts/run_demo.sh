#!/usr/bin/env bash
# Sets up the package and runs the main job on its built-in default dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[examples]"
python3 examples/quickstart/run_quickstart.py "$@"
