#!/usr/bin/env bash
# Sets up the package and runs the main job, the noisy-label benchmark, on its built-in default
# dataset (scikit-learn's digits). It installs what the job needs: the trainer extra and
# scikit-learn (the recipes of examples/ need the examples extra).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[trainer]" scikit-learn
python3 examples/noisy_labels/run_noisy_labels.py "$@"
