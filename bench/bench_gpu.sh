#!/usr/bin/env bash
# One prepared GPU check (no hydra/mlflow needed: the trainer needs only jax/flax/optax/numpy).
# Run from the repo root on the GPU machine, with the four Fashion-MNIST IDX files in $DATA
# (mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/ ; carry ".data"), e.g.
#   DATA=.data/fashion-mnist bash bench/bench_gpu.sh 2>&1 | tee $OUT/gpu.log
# Time-boxed to < 9 minutes (each step has its own timeout, and a failing step does not stop the rest).
# Prints: the platform, one genome's training throughput, then one population of $GENOMES random
# genomes (full training data, $EPOCHS epochs, cold compilation cache) evaluated three ways:
#   devices x1  one program at a time (the plain path)
#   devices x4  four evaluations in flight on the one GPU (DevicePool(per_device=4), the search's GPU default)
#   buckets     masked buckets of up to 16 genomes, one vmapped program each (fmnas_jax.batched)
# and same-shape genomes vmapped vs one after another. The paper-scale population (120 genomes x 10
# epochs) is ~(120/GENOMES) x (10/EPOCHS) x the training part of each wall time, plus 120/GENOMES x compile.
set -uo pipefail
DATA=${DATA:-.data/fashion-mnist}
GENOMES=${GENOMES:-8}
EPOCHS=${EPOCHS:-2}
TRAIN_SIZE=${TRAIN_SIZE:-55000}  # smaller only to smoke-test this script on a CPU
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
POP=(python3 bench/bench_population.py --data-dir "$DATA" --genomes "$GENOMES" --epochs "$EPOCHS" --train-size "$TRAIN_SIZE" --val-size 5000 --cold-only)
step() { local t=$1; shift; echo "== $* (limit ${t}s)"; timeout "$t" "$@" || echo "== exit $? (timeout is 124)"; }
step 40 python3 -c "import jax; print('jax', jax.__version__, 'devices:', jax.devices())"
step 60 python3 bench/bench_trainer.py --data-dir "$DATA" --steps 300 --rounds 3
step 125 "${POP[@]}" --modes devices --workers 1
step 125 "${POP[@]}" --modes devices --workers 4
step 125 "${POP[@]}" --modes buckets --workers 16 --max-waste 4
step 60 python3 bench/bench_batched.py --data-dir "$DATA" --models 16 --epochs 1 --train-size "$TRAIN_SIZE"
