#!/usr/bin/env bash
# The CPU comparisons of the methods on small budgets (examples/translation/README.md and
# examples/cifar/README.md; the committed run records are in results/, see results/README.md):
#
#   bash scripts/run_cpu_comparisons.sh translation   # Multi30k: Adam, SAM, Lookahead, Lookbehind
#   bash scripts/run_cpu_comparisons.sh translation_lr  # the same at lr 5e-4, 1e-3, 2e-3
#   bash scripts/run_cpu_comparisons.sh cifar         # CIFAR-10 subset: SGD, SAM, ... 2 seeds
#   bash scripts/run_cpu_comparisons.sh cifar_plateau # the same 250 images, to the plateau
#   bash scripts/run_cpu_comparisons.sh cifar_noisy   # 40 % label noise: SGD, SAM, Lookbehind
#   bash scripts/run_cpu_comparisons.sh tables        # the README tables from the finished runs
#
# Every run is one process with one thread (OMP_NUM_THREADS=1), so the two tracks can run side by
# side on two cores. A run whose all_results.json exists is skipped, so an interrupted track
# continues where it stopped. Run outputs go to $RUNS (default outputs/cpu_comparisons,
# git-ignored).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-outputs/cpu_comparisons}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------- translation
# Multi30k de-en, Moses-tokenized and lowercased once (the recipe's --moses_tokenize, saved to
# files so that each run skips it); the first 5,000 training pairs, a joint BPE of 2,000
# subwords learned on them (shared by every run), a 2+2-layer Transformer of width 128
# (1.28M parameters), 1,000 steps of at most 2,048 tokens (about 20 epochs of the subset),
# Adam lr 2e-3 with 100 warm-up steps and a cosine decay to 0, greedy decoding, validation
# loss and BLEU every 250 steps. Adam's validation loss levels off here: the plateau of a model
# that has begun to overfit its 5,000 pairs (training loss well below validation loss).
TRANSLATION_DATA=$RUNS/data/multi30k_tok
TRANSLATION_RUNS=$RUNS/translation_plateau
TRANSLATION_COMMON=(
  --data_dir "$TRANSLATION_DATA" --validation_split val --test_split test_2016_flickr
  --max_train_samples 5000 --bpe_vocab_size 2000 --subword_dir "$RUNS/data/subwords_multi30k_5k"
  --d_model 128 --encoder_layers 2 --decoder_layers 2 --attention_heads 4 --ffn_dim 512
  --dropout 0.1 --max_tokens 2048 --max_steps 1000
  --learning_rate 2e-3 --lr_scheduler_type cosine --warmup_steps 100
  --adam_beta2 0.98 --weight_decay 1e-4 --label_smoothing_factor 0.1 --max_grad_norm 0
  --do_train --do_eval --do_predict --predict_with_generate --generation_num_beams 1
  --generation_max_length 80 --per_device_eval_batch_size 128 --logging_steps 50
  --eval_strategy steps --eval_steps 250
  --save_strategy no --report_to none --use_cpu --disable_tqdm true
)
JOBS=${JOBS:-2}  # runs side by side, one thread each

prepare_multi30k() {
  [[ -f $TRANSLATION_DATA/train.en ]] && return
  "$PYTHON" examples/translation/prepare_parallel_text.py "$DATA/multi30k_de_en" "$TRANSLATION_DATA"
}

translate() {  # NAME SEED FLAGS...
  local name=$1 seed=$2 dir=$TRANSLATION_RUNS/$1_seed$2
  shift 2
  [[ -f $dir/all_results.json ]] && return
  mkdir -p "$dir"
  echo "$(date -u +%H:%M:%S) translation $name seed $seed: $*"
  nice -n 10 "$PYTHON" examples/translation/run_translation.py "${TRANSLATION_COMMON[@]}" \
    --seed "$seed" --output_dir "$dir" "$@" >"$dir/log.txt" 2>&1
}

in_parallel() {  # FUNCTION JOB...: each JOB is the arguments of one FUNCTION call, as one
  local run=$1 job  # string; JOBS calls at a time
  shift
  for job in "$@"; do
    while (($(jobs -rp | wc -l) >= JOBS)); do wait -n || true; done
    eval "$run $job" &
  done
  wait
}

best_rho() {  # FOLDER PREFIX [METRIC]: the rho of the runs FOLDER/PREFIX_rho*_seed0 with the
  "$PYTHON" - "$@" <<'EOF'  # highest METRIC in all_results.json (default eval_bleu)
import json
import sys
from pathlib import Path

folder, prefix, metric = (sys.argv[1:] + ["eval_bleu"])[:3]
runs = Path(folder).glob(f"{prefix}_rho*_seed0/all_results.json")
scores = {p.parent.name.split("_rho")[1].split("_seed")[0]: json.loads(p.read_text())[metric]
          for p in runs}
print(max(scores, key=scores.get))
EOF
}

keep_record() {  # DIR RECORD FLAGS...: a finished run's results, log history and flags in
  local dir=$1 record=$2  # RECORD (committed; a run whose record exists is skipped)
  shift 2
  mkdir -p "$record"
  cp "$dir/all_results.json" "$dir/trainer_state.json" "$record/"
  printf '%s\n' "$*" >"$record/flags.txt"
}

LOOKBEHIND="--lookbehind_method lookbehind --minibatch_switching --lookbehind_k 2"
LOOKAHEAD_ADAM="--lookbehind_method lookahead --perturbation none --lookbehind_k 2"

run_translation() {
  prepare_multi30k
  local sam lookbehind adaptive
  # Seed 0: Adam, Lookahead-Adam, a rho sweep for SAM and Lookbehind-SAM (the paper tunes rho
  # per method), and Lookbehind with alpha 1 and rho 0: every inner step descends with a
  # gradient taken at S, nothing else differs from Adam (why Lookbehind trails here). The runs
  # of two passes per step first, so that the two slots end together.
  in_parallel translate \
    "sam_rho0.05 0 --lookbehind_method sam --rho 0.05" \
    "lookbehind_a0.8_rho0.02 0 $LOOKBEHIND --lookbehind_alpha 0.8 --rho 0.02" \
    "lookbehind_adaptive_rho0.02 0 $LOOKBEHIND --lookbehind_adaptive_alpha --rho 0.02" \
    "sam_rho0.02 0 --lookbehind_method sam --rho 0.02" \
    "lookbehind_a0.8_rho0.05 0 $LOOKBEHIND --lookbehind_alpha 0.8 --rho 0.05" \
    "sam_rho0.1 0 --lookbehind_method sam --rho 0.1" \
    "lookbehind_a0.8_rho0.01 0 $LOOKBEHIND --lookbehind_alpha 0.8 --rho 0.01" \
    "lookbehind_a1_rho0 0 $LOOKBEHIND --lookbehind_alpha 1 --rho 0" \
    "adam 0 --lookbehind_method none" \
    "lookahead_adam_a0.8 0 $LOOKAHEAD_ADAM --lookbehind_alpha 0.8"
  sam=$(best_rho "$TRANSLATION_RUNS" sam) lookbehind=$(best_rho "$TRANSLATION_RUNS" lookbehind_a0.8)
  adaptive=$(best_rho "$TRANSLATION_RUNS" lookbehind_adaptive)
  # Seed 1 at each method's best rho (by seed 0's validation BLEU), and Lookbehind-SAM with
  # alpha 1 at its best rho (the slow weights then take the full k inner steps).
  in_parallel translate \
    "lookbehind_a1_rho$lookbehind 0 $LOOKBEHIND --lookbehind_alpha 1 --rho $lookbehind" \
    "sam_rho$sam 1 --lookbehind_method sam --rho $sam" \
    "lookbehind_a0.8_rho$lookbehind 1 $LOOKBEHIND --lookbehind_alpha 0.8 --rho $lookbehind" \
    "lookbehind_adaptive_rho$adaptive 1 $LOOKBEHIND --lookbehind_adaptive_alpha --rho $adaptive" \
    "adam 1 --lookbehind_method none" \
    "lookahead_adam_a0.8 1 $LOOKAHEAD_ADAM --lookbehind_alpha 0.8"
}

# ------------------------------------------------------------------------- translation_lr
# The learning-rate study: the same data and model with the paper's schedule shape (Adam
# betas (0.9, 0.98), inverse-sqrt decay after a linear warm-up of 200 steps: about 4 epochs of
# the 5,000 pairs, as fairseq's 4,000 steps are about 4 epochs of IWSLT'14), at lr 5e-4 (the
# paper's), 1e-3 and 2e-3. Every run trains to its plateau: validation loss every 250 steps,
# stop once it has not improved for 2 evaluations (--early_stopping_patience), then validation
# and test BLEU of the best checkpoint by validation loss; --max_steps is only a cap. A finished
# run's all_results.json and trainer_state.json are kept in $LR_RECORDS (committed), and a run
# whose record exists is skipped, so the study continues where it stopped.
LR_RUNS=$RUNS/translation_lr
LR_RECORDS=${LR_RECORDS:-results/translation_lr_study}
LR_COMMON=(
  --data_dir "$TRANSLATION_DATA" --validation_split val --test_split test_2016_flickr
  --max_train_samples 5000 --bpe_vocab_size 2000 --subword_dir "$RUNS/data/subwords_multi30k_5k"
  --d_model 128 --encoder_layers 2 --decoder_layers 2 --attention_heads 4 --ffn_dim 512
  --dropout 0.1 --max_tokens 2048
  --lr_scheduler_type inverse_sqrt --warmup_steps 200 --adam_beta1 0.9 --adam_beta2 0.98
  --weight_decay 1e-4 --label_smoothing_factor 0.1 --max_grad_norm 0
  --do_train --do_eval --do_predict --predict_with_generate --generation_num_beams 1
  --generation_max_length 80 --per_device_eval_batch_size 128 --logging_steps 50
  --eval_strategy steps --eval_steps 250 --save_strategy steps --save_steps 250
  --save_total_limit 1 --load_best_model_at_end --early_stopping_patience 2
  --report_to none --use_cpu --disable_tqdm true
)

translate_lr() {  # LR NAME SEED FLAGS...
  local lr=$1 name=$2 seed=$3 run=lr$1/$2_seed$3
  local dir=$LR_RUNS/$run record=$LR_RECORDS/$run max_steps
  shift 3
  [[ -f $record/all_results.json ]] && return
  case $lr in 5e-4) max_steps=8000 ;; 1e-3) max_steps=6000 ;; *) max_steps=4000 ;; esac
  mkdir -p "$dir"
  echo "$(date -u +%H:%M:%S) translation lr $lr $name seed $seed: $*"
  nice -n 19 "$PYTHON" examples/translation/run_translation.py "${LR_COMMON[@]}" \
    --learning_rate "$lr" --max_steps "$max_steps" --seed "$seed" --output_dir "$dir" "$@" \
    >"$dir/log.txt" 2>&1 || { echo "failed: $dir/log.txt" >&2; return 1; }
  rm -rf "$dir"/checkpoint-*
  keep_record "$dir" "$record" "$@"
}

lr_methods() {  # LR SEED: the five methods of the table at one learning rate
  echo "$1 lookbehind_a0.8_rho0.01 $2 $LOOKBEHIND --lookbehind_alpha 0.8 --rho 0.01"
  echo "$1 lookbehind_adaptive_rho0.01 $2 $LOOKBEHIND --lookbehind_adaptive_alpha --rho 0.01"
  echo "$1 sam_rho0.02 $2 --lookbehind_method sam --rho 0.02"
  echo "$1 lookbehind_a1_rho0 $2 $LOOKBEHIND --lookbehind_alpha 1 --rho 0"
  echo "$1 adam $2 --lookbehind_method none"
}

run_translation_lr() {
  prepare_multi30k
  local lr jobs
  # Seed 0 of the five methods at each learning rate, the paper's first; rho from the lr 2e-3
  # comparison above (SAM 0.02, Lookbehind-SAM 0.01).
  for lr in 5e-4 2e-3 1e-3; do
    mapfile -t jobs < <(lr_methods "$lr" 0)
    in_parallel translate_lr "${jobs[@]}"
  done
  # At lr 5e-4: a rho sweep around those values, then seed 1 of Adam, SAM and Lookbehind-SAM
  # (alpha 0.8 and adaptive) at the best rho of SAM and of Lookbehind-SAM alpha 0.8 (by seed
  # 0's validation BLEU).
  in_parallel translate_lr \
    "5e-4 sam_rho0.05 0 --lookbehind_method sam --rho 0.05" \
    "5e-4 lookbehind_a0.8_rho0.02 0 $LOOKBEHIND --lookbehind_alpha 0.8 --rho 0.02" \
    "5e-4 sam_rho0.005 0 --lookbehind_method sam --rho 0.005" \
    "5e-4 lookbehind_a0.8_rho0.005 0 $LOOKBEHIND --lookbehind_alpha 0.8 --rho 0.005"
  local sam lookbehind
  sam=$(best_rho "$LR_RECORDS/lr5e-4" sam) lookbehind=$(best_rho "$LR_RECORDS/lr5e-4" lookbehind_a0.8)
  in_parallel translate_lr \
    "5e-4 lookbehind_a0.8_rho$lookbehind 1 $LOOKBEHIND --lookbehind_alpha 0.8 --rho $lookbehind" \
    "5e-4 sam_rho$sam 1 --lookbehind_method sam --rho $sam" \
    "5e-4 lookbehind_adaptive_rho$lookbehind 1 $LOOKBEHIND --lookbehind_adaptive_alpha --rho $lookbehind" \
    "5e-4 adam 1 --lookbehind_method none"
  # Seed 1 of the five methods at lr 1e-3, the highest rate where they were level on seed 0.
  mapfile -t jobs < <(lr_methods 1e-3 1)
  in_parallel translate_lr "${jobs[@]}"
}

# ---------------------------------------------------------------------------------- cifar
# CIFAR-10: a fixed random subset of 250 training images and one of 1,000 test images
# (scripts/cifar_subset.py, seed 0), ResNet-8, batch 50, 20 epochs (100 steps), lr 0.1 x0.1 at
# epochs 10 and 15, random flips but no crop (so that training accuracy saturates in this
# budget), evaluation every 5 epochs (25 steps); SGD momentum 0.9, weight decay 5e-4 on every
# parameter, rho 0.05, k 2, alpha 0.5 (the paper's values).
CIFAR_TRAIN=$RUNS/data/cifar10_train_250.parquet
CIFAR_TEST=$RUNS/data/cifar10_test_1000.parquet
CIFAR_COMMON=(
  --model_name resnet8 --train_path "$CIFAR_TRAIN" --validation_path "$CIFAR_TEST"
  --per_device_train_batch_size 50 --num_train_epochs 20 --lr_decay_epochs 10 15
  --crop_padding 0 --eval_strategy steps --eval_steps 25 --save_strategy no
  --dataloader_num_workers 0 --report_to none --use_cpu --disable_tqdm true
  --max_grad_norm 1.0  # the runs were made with the Trainer's clipping, before the recipe's
)                      # paper defaults switched it off (the public code does not clip)

# The plateau setup: the same 250 images with batch 25 for 40 epochs (400 steps), lr x0.1 at
# epochs 30 and 35, the recipe's paper defaults otherwise (no clipping): SGD's training loss
# falls to about 0.2 (from 1.0 in the setup above), near the plateau of a memorised training
# set, the regime of the paper's claims.
CIFAR_PLATEAU=(
  --model_name resnet8 --train_path "$CIFAR_TRAIN" --validation_path "$CIFAR_TEST"
  --per_device_train_batch_size 25 --num_train_epochs 40 --lr_decay_epochs 30 35
  --crop_padding 0 --eval_strategy steps --eval_steps 100 --save_strategy no
  --dataloader_num_workers 0 --report_to none --use_cpu --disable_tqdm true
)
CIFAR_SETUP=cifar

train_cifar() {  # NAME SEED FLAGS...
  local name=$1 seed=$2 dir=$RUNS/$CIFAR_SETUP/$1_seed$2 common
  shift 2
  [[ -f $dir/all_results.json ]] && return
  mkdir -p "$dir"
  if [[ $CIFAR_SETUP == cifar_plateau ]]; then common=("${CIFAR_PLATEAU[@]}")
  else common=("${CIFAR_COMMON[@]}"); fi
  echo "$(date -u +%H:%M:%S) $CIFAR_SETUP $name seed $seed: $*"
  nice -n 10 "$PYTHON" examples/cifar/run_cifar.py "${common[@]}" \
    --seed "$seed" --output_dir "$dir" "$@" >"$dir/log.txt" 2>&1
}

run_cifar() {
  [[ -f $CIFAR_TRAIN ]] ||
    "$PYTHON" scripts/cifar_subset.py "$DATA/cifar10/train.parquet" "$CIFAR_TRAIN" --num_rows 250
  [[ -f $CIFAR_TEST ]] ||
    "$PYTHON" scripts/cifar_subset.py "$DATA/cifar10/test.parquet" "$CIFAR_TEST" --num_rows 1000
  local seed
  for seed in ${SEEDS:-0 1}; do
    train_cifar sgd "$seed" --lookbehind_method none
    train_cifar sam "$seed" --lookbehind_method sam --rho 0.05
    train_cifar lookbehind_a0.5 "$seed" --lookbehind_method lookbehind --lookbehind_k 2 \
      --lookbehind_alpha 0.5 --rho 0.05
    train_cifar lookbehind_adaptive "$seed" --lookbehind_method lookbehind --lookbehind_k 2 \
      --lookbehind_adaptive_alpha --rho 0.05
    train_cifar multistep "$seed" --lookbehind_method multistep --lookbehind_k 2 --rho 0.05
    train_cifar lookahead_sam_a0.5 "$seed" --lookbehind_method lookahead --perturbation sam \
      --lookbehind_k 2 --lookbehind_alpha 0.5 --rho 0.05
  done
}

# ---------------------------------------------------------------------------- cifar_noisy
# CIFAR-10 with 40 % symmetric label noise (--label_noise 0.4, noise seed 0: the same corrupted
# labels in every run): ResNet-8 on a fixed random subset of 2,000 training images
# (scripts/cifar_subset.py, seed 0), 1,000 test images, batch 32, lr 0.05, 60 epochs (3,780
# steps), lr x0.1 at epochs 30 and 45, flips but no crop, the recipe's paper defaults otherwise
# (SGD momentum 0.9, weight decay 5e-4); test accuracy and the share of the corrupted labels
# fitted after every epoch. SGD's test accuracy peaks and then falls as it fits the noise (over
# 90 % of the corrupted labels by the last epoch): the regime where memorisation matters.
# Seed 0: SGD and rho 0.05, 0.1, 0.2 for SAM, Lookbehind-SAM (k 2, alpha 0.5) and
# Lookbehind-SAM with adaptive alpha, and SAM at rho 0.4 too (its best of the three was the
# largest, while Lookbehind's k = 2 ascents already reach about 2 rho); then seeds 1 and 2 of
# SGD and of each method at its rho with the best final test accuracy of seed 0, and seeds 0-2
# of SAM at its best rho for 90 epochs (decays at 45 and 67): Lookbehind-SAM's 3 passes per step
# over 60 epochs, in SAM's 2 per step (equal gradient computations). A finished run's
# all_results.json and trainer_state.json are kept in $NOISY_RECORDS (committed), and a run
# whose record exists is skipped.
NOISY_RUNS=$RUNS/cifar_noisy
NOISY_RECORDS=${NOISY_RECORDS:-results/cifar_noisy_labels}
NOISY_TRAIN=$RUNS/data/cifar10_train_2000.parquet
NOISY_COMMON=(
  --model_name resnet8 --train_path "$NOISY_TRAIN" --validation_path "$CIFAR_TEST"
  --per_device_train_batch_size 32 --learning_rate 0.05
  --label_noise 0.4 --label_noise_seed 0 --num_train_epochs 60 --lr_decay_epochs 30 45
  --crop_padding 0 --eval_strategy epoch --save_strategy no
  --dataloader_num_workers 0 --report_to none --use_cpu --disable_tqdm true
)
NOISY_LOOKBEHIND="--lookbehind_method lookbehind --lookbehind_k 2"

train_noisy() {  # NAME SEED FLAGS...
  local name=$1 seed=$2
  local dir=$NOISY_RUNS/$1_seed$2 record=$NOISY_RECORDS/$1_seed$2
  shift 2
  [[ -f $record/all_results.json ]] && return
  mkdir -p "$dir"
  echo "$(date -u +%H:%M:%S) cifar_noisy $name seed $seed: $*"
  nice -n 19 "$PYTHON" examples/cifar/run_cifar.py "${NOISY_COMMON[@]}" \
    --seed "$seed" --output_dir "$dir" "$@" >"$dir/log.txt" 2>&1 ||
    { echo "failed: $dir/log.txt" >&2; return 1; }
  keep_record "$dir" "$record" "$@"
}

noisy_methods() {  # SEED RHO_SAM RHO_LOOKBEHIND RHO_ADAPTIVE: SAM and Lookbehind-SAM's jobs
  echo "sam_rho$2 $1 --lookbehind_method sam --rho $2"
  echo "lookbehind_a0.5_rho$3 $1 $NOISY_LOOKBEHIND --lookbehind_alpha 0.5 --rho $3"
  echo "lookbehind_adaptive_rho$4 $1 $NOISY_LOOKBEHIND --lookbehind_adaptive_alpha --rho $4"
}

run_cifar_noisy() {
  [[ -f $NOISY_TRAIN ]] ||
    "$PYTHON" scripts/cifar_subset.py "$DATA/cifar10/train.parquet" "$NOISY_TRAIN" --num_rows 2000
  [[ -f $CIFAR_TEST ]] ||
    "$PYTHON" scripts/cifar_subset.py "$DATA/cifar10/test.parquet" "$CIFAR_TEST" --num_rows 1000
  local rho seed jobs
  mapfile -t jobs < <(echo "sgd 0 --lookbehind_method none"
    for rho in 0.1 0.05 0.2; do noisy_methods 0 "$rho" "$rho" "$rho"; done
    echo "sam_rho0.4 0 --lookbehind_method sam --rho 0.4")
  in_parallel train_noisy "${jobs[@]}"
  local best=("$(best_rho "$NOISY_RECORDS" sam eval_accuracy)"
    "$(best_rho "$NOISY_RECORDS" lookbehind_a0.5 eval_accuracy)"
    "$(best_rho "$NOISY_RECORDS" lookbehind_adaptive eval_accuracy)")
  mapfile -t jobs < <(for seed in 1 2; do
    echo "sgd $seed --lookbehind_method none" && noisy_methods "$seed" "${best[@]}"; done
    for seed in 0 1 2; do  # SAM with Lookbehind-SAM's gradient computations: 90 epochs
      echo "sam_90_epochs_rho${best[0]} $seed --lookbehind_method sam --rho ${best[0]}" \
        "--num_train_epochs 90 --lr_decay_epochs 45 67"; done)
  in_parallel train_noisy "${jobs[@]}"
}

# --------------------------------------------------------------------------------- tables
finished_runs() {  # FOLDER LAST_FILE PREFIX...: the runs FOLDER/PREFIX*_seed* that have written
  local folder=$1 last_file=$2 prefix run  # their last file, prefixes in order
  shift 2
  for prefix in "$@"; do
    for run in "$folder/$prefix"*_seed*; do
      [[ -f $run/$last_file ]] && echo "$run"
    done
  done
  return 0
}

tables() {
  local runs
  mapfile -t runs < <(finished_runs "$TRANSLATION_RUNS" test_results.json adam sam_rho \
    lookahead_adam lookbehind_a0.8_rho lookbehind_adaptive lookbehind_a1_rho)
  [[ ${#runs[@]} -eq 0 ]] ||
    "$PYTHON" scripts/summarize_runs.py --kind translation --curve eval_loss "${runs[@]}"
  echo
  local lr
  for lr in 5e-4 1e-3 2e-3; do
    mapfile -t runs < <(finished_runs "$LR_RECORDS/lr$lr" all_results.json adam sam_rho \
      lookbehind_a0.8_rho lookbehind_adaptive lookbehind_a1_rho)
    [[ ${#runs[@]} -eq 0 ]] && continue
    echo "lr $lr"
    "$PYTHON" scripts/summarize_runs.py --kind translation "${runs[@]}"
    echo
  done
  mapfile -t runs < <(finished_runs "$NOISY_RECORDS" all_results.json sgd sam_rho \
    sam_90_epochs_rho lookbehind_a0.5_rho lookbehind_adaptive_rho)
  [[ ${#runs[@]} -eq 0 ]] || { echo "cifar_noisy" &&
    "$PYTHON" scripts/summarize_runs.py --kind noisy "${runs[@]}" && echo; }
  local setup
  for setup in cifar cifar_plateau; do
    mapfile -t runs < <(finished_runs "$RUNS/$setup" eval_results.json sgd sam multistep \
      lookahead_sam lookbehind_a0.5 lookbehind_adaptive)
    [[ ${#runs[@]} -eq 0 ]] || "$PYTHON" scripts/summarize_runs.py --group_seeds "${runs[@]}"
    echo
  done
}

case ${1:-} in
  translation) run_translation ;;
  translation_lr) run_translation_lr ;;
  cifar) run_cifar ;;
  cifar_plateau) CIFAR_SETUP=cifar_plateau run_cifar ;;
  cifar_noisy) run_cifar_noisy ;;
  tables) tables ;;
  *) echo "usage: $0 translation|translation_lr|cifar|cifar_plateau|cifar_noisy|tables" >&2 && exit 2 ;;
esac
