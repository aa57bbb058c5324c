#!/usr/bin/env bash
# One prepared call for a GPU machine (this workplace's `device` tool, or any CUDA box), run from the repo root:
#   cp ../shared/data/cifar10-jpeg.tar.gz device-data/   # device-data/ is git-ignored; name it in `carry`
#   bash bench/device.sh                                  # results land in $OUT (or ./device-out)
# Throughput needs only torch and torchvision; packing and fidelity run the real sweep and so need Ray
# (pip install -e . where the network allows; see FIDELITY.md for machines without it).
set -euo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT" /tmp/cifar10
tar xzf device-data/cifar10-jpeg.tar.gz -C /tmp/cifar10
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 bench/throughput.py --device cuda --batch-size 128 32 --images 10000 --data-dir /tmp/cifar10 \
    2>&1 | tee "$OUT/throughput.md"
if python3 -c "import ray" 2>/dev/null; then
    python3 bench/packing.py --data-dir /tmp/cifar10 --concurrency 1,2,4 --epochs 3 --storage /tmp/rr \
        2>&1 | tail -20 | tee "$OUT/packing.md"
    python3 bench/fidelity.py --data-dir /tmp/cifar10 --storage /tmp/rr --name fidelity \
        2>&1 | tail -30 | tee "$OUT/fidelity.md"
else
    echo "no Ray on this machine: packing and fidelity skipped" | tee "$OUT/skipped.txt"
fi
