#!/usr/bin/env bash
# Table 1 runs on one GPU: the convolutional MNIST-family models that are too slow for a 2-core
# CPU, trained side by side (one process each) with the recipe of the shipped models/mnist.
#
#   bash benchmarks/table1_gpu.sh DATA_DIR OUT_DIR [SECONDS]
#
# DATA_DIR holds MNIST/raw/*-ubyte.gz and FashionMNIST/raw/*-ubyte.gz (the gzipped IDX files; the
# Debian package dataset-fashion-mnist ships the latter). Each run stops after SECONDS (default
# 480) and keeps its last finished epoch; `fpn-train --resume OUT_DIR/NAME/checkpoint.pt`
# finishes it anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$1
out=$2
limit=${3:-480}
root=${TMPDIR:-/tmp}/fpn-table1-data
for d in MNIST FashionMNIST; do
  mkdir -p "$root/$d/raw"
  for f in "$src/$d/raw/"*.gz; do gunzip -c "$f" >"$root/$d/raw/$(basename "$f" .gz)"; done
done
nvidia-smi -L || true
mkdir -p "$out"
recipe=(--dropout 0.1 --augment-shift 2 --augment-rotate 10 --augment-scale 0.1 --seed 0 --device cuda --data-root "$root")
run() {
  local name=$1
  shift
  timeout "$limit" python3 -m training.train --out "$out/$name" "${recipe[@]}" "$@" >"$out/$name.log" 2>&1 ||
    echo "$name: stopped with status $? (its last finished epoch is kept)"
}
run mnist_conv-explicit --arch mnist_conv --backprop explicit --epochs 40 &
run fashion-mnist_conv --dataset fashion-mnist --arch mnist_conv --epochs 25 &
wait
for name in mnist_conv-explicit fashion-mnist_conv; do
  echo "== $name"
  grep -E "epoch|error" "$out/$name.log" | tail -n 3 || true
done
