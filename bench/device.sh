#!/usr/bin/env bash
# One call on a GPU machine, run from the repository root, within 9 minutes with the data's unpacking (the
# runner's budget: 480 s from the start of this script): the training step's modes, packing with and without
# MPS, checkpoint share, fidelity and a study projection, as Markdown files in $OUT (default ./device-out).
# Needs torch, torchvision, numpy, pandas and Pillow; not Ray, not a network, nothing installed (PYTHONPATH).
#
#   mkdir -p device-data && cp ../shared/data/cifar10-jpeg.tar.gz device-data/   # device-data/ is git-ignored
#   bash bench/device.sh                                  # the measurement (bench/device.py's budget: 480 s)
#   bash bench/device.sh --parts ab                       # the fidelity A/B alone (bench/ab.py), same budget
#   bash bench/device.sh --step graph --augment-chunk 8192 # (b) to (d) with this step, not (a)'s fastest
#   bash bench/device.sh --smoke --data-dir DIR           # the same parts, tiny, on any machine
# Other arguments go to bench/device.py (see its --help).
set -euo pipefail
START=$(date +%s)
OUT=${OUT:-device-out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

args=("$@")
if [[ " $* " != *" --data-dir "* ]]; then
    DATA=${DATA:-/tmp/cifar10}
    if [ ! -d "$DATA/train" ]; then
        mkdir -p "$DATA"
        tar xzf device-data/cifar10-jpeg.tar.gz -C "$DATA"
    fi
    args+=(--data-dir "$DATA")
fi
"$PYTHON" bench/device.py --out "$OUT" --started-at "$START" "${args[@]}" 2>&1 | tee "$OUT/log.txt"
