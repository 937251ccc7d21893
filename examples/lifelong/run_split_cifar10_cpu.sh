#!/usr/bin/env bash
# The measured CPU table of the README: every Table 2 row on Split-CIFAR10 (5 tasks of 2
# classes) from ../shared/data/cifar10, 400 training and 400 test images per task, 2 epochs per
# task, the La-MAML CNN at 16 channels, seeds 0 and 1, one thread per run, JOBS runs at a time.
# Usage: JOBS=2 bash examples/lifelong/run_split_cifar10_cpu.sh [OUTPUT_DIR] [DATA_DIR]
set -euo pipefail
out=${1:-out/lifelong_split_cifar10_cpu}
data=${2:-../shared/data/cifar10}
common="--benchmark split_cifar10 --train_path $data/train.parquet \
--validation_path $data/test.parquet --train_samples_per_task 400 \
--test_samples_per_task 400 --epochs_per_task 2 --cnn_channels 16 --seeds 0 1 --device cpu"
rows="sgd|--method sgd
er_sgd|--method sgd --episodic_replay
sam|--method sam
er_sam|--method sam --episodic_replay
multistep_sam|--method multistep_sam
lookahead_cmaml|--method lookahead_cmaml
lookbehind_sam|--method lookbehind_sam
er_multistep_sam|--method multistep_sam --episodic_replay
er_lookbehind_sam|--method lookbehind_sam --episodic_replay
lookbehind_cmaml|--method lookbehind_cmaml"
started=$(date +%s)
mkdir -p "$out"
echo "$rows" | OMP_NUM_THREADS=1 xargs -P "${JOBS:-1}" -I{} bash -c \
    'row="{}"; name=${row%%|*}; python3 examples/lifelong/run_lifelong.py '"$common"' \
    ${row#*|} --output_dir '"$out"'/$name > '"$out"'/$name.log 2>&1'
echo "total wall seconds: $(( $(date +%s) - started ))"
python3 examples/lifelong/summarize_lifelong.py "$out"/*/results.json
