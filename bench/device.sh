#!/usr/bin/env bash
# One call on a GPU machine, run from the repository root, within 9 minutes with the data's unpacking (the
# runner's budget: 480 s from the start of this script; a hard stop at HARD_STOP_S, 540 s): first the captured
# step's correctness tests (tests/test_gpu_step.py, time-boxed; the graph rows are skipped if they fail), then
# the training step's modes, packing with and without MPS, checkpoint share, fidelity and a study projection.
# Results in $OUT (default ./device-out), at most 8 files, no folder: summary.md (rewritten after every part,
# and on any exit), rows.jsonl (each row as it is measured), gpu-tests.txt and log.txt.
# Needs torch, torchvision, numpy, pandas and Pillow (pytest for the tests); not Ray, not a network, nothing
# installed (PYTHONPATH).
#
#   mkdir -p device-data && cp ../shared/data/cifar10-jpeg.tar.gz device-data/   # device-data/ is git-ignored
#   bash bench/device.sh                                  # the measurement (bench/device.py's budget: 480 s)
#   bash bench/device.sh --parts ab                       # the fidelity A/B alone (bench/ab.py), same budget
#   bash bench/device.sh --step graph --augment-chunk 8192 # (b) to (d) with this step, not (a)'s fastest
#   bash bench/device.sh --smoke --data-dir DIR           # the same parts, tiny, on any machine
# Other arguments go to bench/device.py (see its --help).
set -uo pipefail
START=$(date +%s)
OUT=${OUT:-device-out}
PYTHON=${PYTHON:-python3}
HARD_STOP_S=${HARD_STOP_S:-540}  # from START; the call's own limit is 600 s
GPU_TESTS_S=${GPU_TESTS_S:-120}
mkdir -p "$OUT"
# Every file below is written by its name: in a folder another user owns or may write, they could plant links there.
if [ -L "$OUT" ] || [ ! -O "$OUT" ] || [ -n "$(find "$OUT" -maxdepth 0 -perm -002 -print)" ]; then
    echo "bench/device.sh: OUT=$OUT is a link, another user's folder, or writable by all; allowed: a folder of yours alone" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# MPS, if part (b) starts it, keeps its folders here; whatever ends this call, its daemon is told to quit.
TUNE_ALEXNET_MPS_DIR=$(mktemp -d)
export TUNE_ALEXNET_MPS_DIR
quit_mps() {
    if [ -e "$TUNE_ALEXNET_MPS_DIR/mps-pipe/control" ] && command -v nvidia-cuda-mps-control >/dev/null; then
        echo quit | CUDA_MPS_PIPE_DIRECTORY="$TUNE_ALEXNET_MPS_DIR/mps-pipe" timeout 30 nvidia-cuda-mps-control || true
    fi
    rm -rf "$TUNE_ALEXNET_MPS_DIR"
}
trap quit_mps EXIT

args=("$@")
if [[ " $* " != *" --data-dir "* ]]; then
    DATA=${DATA:-device-data/cifar10}  # in the checkout: a shared /tmp could hold another user's images
    if [ ! -d "$DATA/train" ]; then
        mkdir -p "$DATA"
        tar xzf device-data/cifar10-jpeg.tar.gz -C "$DATA"
    fi
    args+=(--data-dir "$DATA")
fi

GPU_TESTS=not-run
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    timeout -k 5 "$GPU_TESTS_S" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu_step.py >"$OUT/gpu-tests.txt" 2>&1
    case $? in
        0) GPU_TESTS=passed ;;
        124 | 137) GPU_TESTS=failed; echo "stopped after ${GPU_TESTS_S} s" >>"$OUT/gpu-tests.txt" ;;
        *) GPU_TESTS=failed ;;
    esac
else
    echo "not run: pytest is not installed" >"$OUT/gpu-tests.txt"
fi
echo "tests/test_gpu_step.py: $GPU_TESTS ($(tail -n 1 "$OUT/gpu-tests.txt"))"

LEFT=$((HARD_STOP_S - ($(date +%s) - START)))
timeout -k 10 "$((LEFT > 10 ? LEFT : 10))" "$PYTHON" bench/device.py --out "$OUT" --started-at "$START" \
    --gpu-tests "$GPU_TESTS" "${args[@]}" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
