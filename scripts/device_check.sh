#!/usr/bin/env bash
# The GPU check, as one command for a lent GPU machine (the device tool), from the repository
# root:
#   1. CIFAR-10 (the copy in .device_data/cifar10) with examples/cifar/run_cifar.py, EPOCHS
#      epochs each of SGD, SAM and Lookbehind-SAM (k = 2, alpha 0.5), cosine schedule;
#   2. a table of final/best accuracy and seconds of training per epoch per method;
#   3. scripts/benchmark_step.py --device cuda --full (ResNet-34 b128 fp32, ViT-B/16 b64 bf16).
# scripts/prepare_device_check.sh writes .device_data and .whl here first; carry both.
# Everything the check reports goes to $OUT (at most 8 files come back): benchmark.txt/.json,
# cifar.log, summary.md/.json. Settings (environment): EPOCHS (5), MODEL (resnet18), DATA
# (.device_data/cifar10), BENCHMARK (1; 0 skips step 3), PRECISION (--bf16), CIFAR_FLAGS
# (appended to every run), RUNS_DIR (where the runs write; default a temporary folder), WHEELS
# (.whl; empty: install none).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS-.whl}
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

OUT=${OUT:-out/device_check}
EPOCHS=${EPOCHS:-5}
MODEL=${MODEL:-resnet18}
DATA=${DATA:-.device_data/cifar10}
BENCHMARK=${BENCHMARK:-1}
PRECISION=${PRECISION---bf16}
RUNS_DIR=${RUNS_DIR:-$(mktemp -d)}
mkdir -p "$OUT"

python3 - <<'PY'
import accelerate, datasets, timm, torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate "
      f"{accelerate.__version__}, datasets {datasets.__version__}, timm {timm.__version__}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY

declare -A METHOD_FLAGS=(
    [sgd]="--lookbehind_method none"
    [sam]="--lookbehind_method sam --rho 0.05"
    [lookbehind]="--lookbehind_method lookbehind --lookbehind_k 2 --lookbehind_alpha 0.5 --rho 0.05"
)
runs=()
for method in sgd sam lookbehind; do
    # shellcheck disable=SC2086  # the flag strings are word lists
    python3 examples/cifar/run_cifar.py --model_name "$MODEL" \
        --train_path "$DATA/train.parquet" --validation_path "$DATA/test.parquet" \
        --num_train_epochs "$EPOCHS" --lr_schedule trainer --lr_scheduler_type cosine \
        --save_strategy no --report_to none --seed 0 $PRECISION ${METHOD_FLAGS[$method]} \
        ${CIFAR_FLAGS:-} --output_dir "$RUNS_DIR/$method" 2>&1 | tee -a "$OUT/cifar.log"
    runs+=("$method=$RUNS_DIR/$method")
done
python3 scripts/summarize_runs.py "${runs[@]}" --json "$OUT/summary.json" | tee "$OUT/summary.md"

if [ "$BENCHMARK" = 1 ]; then
    python3 scripts/benchmark_step.py --device cuda --full --json "$OUT/benchmark.json" 2>&1 |
        tee "$OUT/benchmark.txt"
fi
