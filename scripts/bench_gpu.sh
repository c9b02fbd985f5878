#!/usr/bin/env bash
# One prepared GPU check (no hydra/mlflow needed: the trainer needs only jax/flax/optax/numpy).
# Run from the repo root on the GPU machine, with the four Fashion-MNIST IDX files in $DATA
# (mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/ ; carry ".data"), e.g.
#   DATA=.data/fashion-mnist bash scripts/bench_gpu.sh | tee $OUT/gpu.log
# Prints: the platform, one genome's training throughput, and a population of genomes timed
# with one and several programs in flight on the GPU (paper budget: 10 epochs on 55,000 images).
set -euo pipefail
DATA=${DATA:-.data/fashion-mnist}
GENOMES=${GENOMES:-12}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import jax; print('devices:', jax.devices())"
python3 scripts/bench_trainer.py --data-dir "$DATA" --steps 300 --rounds 3
python3 scripts/bench_population.py --data-dir "$DATA" --modes devices --workers 1 --genomes "$GENOMES" --epochs 10 --train-size 55000 --val-size 5000
python3 scripts/bench_population.py --data-dir "$DATA" --modes devices --workers 4 --genomes "$GENOMES" --epochs 10 --train-size 55000 --val-size 5000
echo "extrapolate: 120 genomes = 10 x the $GENOMES-genome wall time above"
python3 scripts/bench_batched.py --data-dir "$DATA" --models 16 --epochs 2 --train-size 55000
