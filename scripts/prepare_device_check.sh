#!/usr/bin/env bash
# Run before the GPU check, where the shared data is: writes into git-ignored folders of the
# checkout what scripts/device_check.sh needs on a bare GPU machine:
#   .device_data/cifar10/{train,test}.parquet  the shared CIFAR-10 splits, shuffled and
#                                              rewritten with snappy compression (18 MB instead
#                                              of 57 MB, so that the checkout stays small to
#                                              copy); TRAIN_ROWS keeps a random subset
#   .whl/  wheels of the Python packages the GPU image lacks (datasets and its dill and
#          multiprocess) or has in another version (transformers), at the versions installed here
# Then copy the checkout with .device_data and .whl to the GPU machine and run
# `bash scripts/device_check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED_DATA=${SHARED_DATA:-../shared/data}
TRAIN_ROWS=${TRAIN_ROWS:-}

python3 scripts/cifar_subset.py "$SHARED_DATA/cifar10/train.parquet" \
    .device_data/cifar10/train.parquet ${TRAIN_ROWS:+--num_rows "$TRAIN_ROWS"}
python3 scripts/cifar_subset.py "$SHARED_DATA/cifar10/test.parquet" \
    .device_data/cifar10/test.parquet

pinned=$(python3 - <<'PY'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("datasets", "dill", "multiprocess", "transformers")))
PY
)
rm -rf .whl
# shellcheck disable=SC2086  # one argument per package
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl $pinned
du -sh .device_data .whl
