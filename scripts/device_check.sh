#!/usr/bin/env bash
# The GPU check, as one command on a GPU machine, from the repository root:
#   1. scripts/benchmark_ops.py: operations, CUDA kernel launches and host synchronisations of
#      one outer step of every method, ResNet-34 against a 442-tensor MLP (ops.txt/.json; a
#      failure there is reported and the check goes on);
#   2. CIFAR-10 (the copy in .device_data/cifar10) with examples/cifar/run_cifar.py, EPOCHS
#      epochs each of SGD, SAM and Lookbehind-SAM (k = 2, alpha 0.5), cosine schedule, and a
#      table of final accuracy and seconds of training per epoch per method;
#   3. scripts/benchmark_step.py --device cuda --full (ResNet-34 b128 fp32, ViT-B/16 b64 bf16).
# scripts/prepare_device_check.sh writes .device_data and .whl first, where the shared data is;
# copy the checkout with both folders to the GPU machine. The packages of this checkout
# (hf_lookbehind, hf_lookbehind_recipes) are imported from it (PYTHONPATH), not installed.
# Everything the check reports goes to $OUT: ops.txt/.json, benchmark.txt/.json, cifar.log,
# summary.md/.json. Settings (environment): OPS (1; 0 skips step 1), OPS_FLAGS (--device cuda),
# CIFAR (1; 0 skips step 2), EPOCHS (5), MODEL (resnet18), DATA (.device_data/cifar10),
# BENCHMARK (1; 0 skips step 3), PRECISION (--bf16), CIFAR_FLAGS (appended to every run),
# RUNS_DIR (where the runs write; default a temporary folder), WHEELS (.whl; empty: install none).
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
OPS=${OPS:-1}
OPS_FLAGS=${OPS_FLAGS---device cuda}
CIFAR=${CIFAR:-1}
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

if [ "$OPS" = 1 ]; then
    # shellcheck disable=SC2086  # the flag string is a word list
    python3 scripts/benchmark_ops.py $OPS_FLAGS --json "$OUT/ops.json" 2>&1 | tee "$OUT/ops.txt" ||
        echo "scripts/benchmark_ops.py failed (exit status $?); the check goes on" |
        tee -a "$OUT/ops.txt"
fi

if [ "$CIFAR" = 1 ]; then
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
fi

if [ "$BENCHMARK" = 1 ]; then
    python3 scripts/benchmark_step.py --device cuda --full --json "$OUT/benchmark.json" 2>&1 |
        tee "$OUT/benchmark.txt"
fi
