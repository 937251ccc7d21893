#!/usr/bin/env bash
# Sets up the package with its test dependencies and runs the linter and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
python3 -m ruff check .
python3 -m pytest -q "$@"
