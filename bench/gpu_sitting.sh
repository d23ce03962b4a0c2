#!/bin/bash
# One GPU sitting in one command, for a machine lent for a few minutes (under 9 minutes, the device
# tool's 10-minute command included): the GPU check eager (with the clocks the GPU ran at and the
# spread of step times), the model step and the loader alone beside it, the GPU tests, a
# 20,000-image prepared set with decode_on_device, and the check compiled at batch 512. Each part
# has its own time limit, and a part that would end past BUDGET_S is skipped, so the most telling
# parts come first. The log (log.txt) and the reports go to OUT.
#
#   bash bench/gpu_sitting.sh OUT [BASELINE]
#
# BASELINE: another checkout of this project (e.g. `git archive e4822e2 | tar -x -C .gpu/base`),
# whose GPU check runs right after this tree's, on the same machine: the one way to tell a change
# in the trainer from a change in the machine. Python packages the machine lacks (lightly, litdata
# and their needs) are installed first from wheels in .whl/ where that folder exists.
set -u
OUT=${1:?usage: bash bench/gpu_sitting.sh OUT [BASELINE]}
BASELINE=${2:-}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the baseline's part runs in its own folder
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
T0=$(date +%s)
step() {  # step NAME LIMIT_S COMMAND...: run it under its limit, say how it ended and when
    local name=$1 limit=$2; shift 2
    local at=$(( $(date +%s) - T0 ))
    if (( at + limit > BUDGET_S )); then
        echo "=== $name skipped: it could end past the sitting's $BUDGET_S s (t=$at s)"
        return
    fi
    echo "=== $name (limit $limit s, t=$at s)"
    # SIGINT, not SIGTERM: the benchmark stops its training workers (their own process group,
    # which the signal does not reach) on KeyboardInterrupt.
    timeout -s INT -k 10 "$limit" "$@"
    echo "=== $name rc=$? t=$(( $(date +%s) - T0 )) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, pytorch_lightning as pl, timm, lightly, torchvision
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pl', pl.__version__, 'timm',
      timm.__version__, 'lightly', lightly.__version__, 'torchvision', torchvision.__version__,
      torch.cuda.get_device_name(0))"
step check-eager 80 python3 -m bench --gpu --out "$OUT/results-gpu.md"
if [ -n "$BASELINE" ]; then
    (cd "$BASELINE" && step baseline-eager 80 python3 -m bench --gpu --out "$OUT/baseline-gpu.md")
fi
step step-alone-eager 40 python3 -m bench.step_profile --batch-size 256 --rows 0
step loader-alone 35 python3 -m bench.loader --batch-size 256 --batches 100 --warmup 10
# -o addopts=: one process, no pytest-xdist (pytest.ini runs two workers, and xdist may be
# missing on the GPU machine).
step pytest-gpu 90 python3 -m pytest -o addopts= -q -rP -m gpu -p no:cacheprovider tests/test_bench.py \
    tests/test_hardware.py tests/test_crops.py
step generate 50 python3 -c "from pathlib import Path; from bench.data import generate
generate(Path('/tmp/mae-sitting-images'), 20000, 16)"
step prepare 40 python3 -m mae_core.data optimize /tmp/mae-sitting-images /tmp/mae-sitting-prepared
step check-decode-on-device 110 python3 -m bench --gpu --batch-size 512 \
    --data /tmp/mae-sitting-prepared --decode-on-device --out "$OUT/results-gpu-decode-on-device.md"
step check-compile-512 110 python3 -m bench --gpu --compile --batch-size 512 \
    --out "$OUT/results-gpu-compile-512.md"
echo "=== done t=$(( $(date +%s) - T0 )) s"
