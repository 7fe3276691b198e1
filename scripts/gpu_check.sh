#!/usr/bin/env bash
# GPU check (issue 9, point 6), under 10 minutes on one GPU: training-step throughput (ResNet-50, 224 px, fp32 /
# fp16 / bf16), then serving: raw limit, the service (batched), MAX_BATCH_SIZE=1 and the naive app, in fp32, fp16
# and bf16, and the service again with GPU_DECODE=true; prints one summary (also under --out).
#
#   bash scripts/gpu_check.sh --wheelhouse DIR [--out DIR] [--seconds S] [--python PY]
#
# The GPU machine keeps its own torch/torchvision (2.11/0.26 or newer); what else the project needs (flask,
# gunicorn, marshmallow, ...) is installed from DIR, a wheelhouse built on a machine with PyPI access:
#   pip download -d wheelhouse --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#       $(grep -vE '^(torch|torchvision)==' requirements.txt | sed 's/#.*//')
# (use the GPU machine's Python version). Without --wheelhouse, the Python given must already have them.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=reports/gpu-check
SECONDS_PER_POINT=10
WHEELHOUSE=""
PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
    case "$1" in
        --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a directory}; shift 2 ;;
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --seconds) SECONDS_PER_POINT=${2:?--seconds needs a number}; shift 2 ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case "$SECONDS_PER_POINT" in ''|*[!0-9.]*) echo "gpu_check.sh: --seconds must be a number, got '$SECONDS_PER_POINT'" >&2; exit 2 ;; esac

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 3
fi

mkdir -p "$OUT"
if [ -n "$WHEELHOUSE" ]; then
    # A venv that sees the machine's torch and gets the rest from the wheelhouse, offline.
    "$PYTHON" -m venv --system-site-packages "$OUT/venv"
    PYTHON="$OUT/venv/bin/python"
    grep -vE '^(torch|torchvision)==' "$ROOT/requirements.txt" | sed 's/#.*//' > "$OUT/requirements-gpu.txt"
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" -r "$OUT/requirements-gpu.txt"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
"$PYTHON" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
    f"{torch.cuda.get_device_name(0)}")' | tee "$OUT/summary.txt"

for amp in none fp16 bf16; do  # training step and inference, images/s
    "$PYTHON" -m scripts.benchmark --mode model --arch resnet50 --image-size 224 --batch-size 64 --device cuda \
        --amp "$amp" --seconds "$SECONDS_PER_POINT" --json "$OUT/model-$amp.json" | tee -a "$OUT/summary.txt"
done
"$PYTHON" -m scripts.benchmark --untrained resnet50 --precision fp32 fp16 bf16 --concurrency 1 32 \
    --max-batch-size 32 --seconds "$SECONDS_PER_POINT" --warmup 3 --out "$OUT/serving" > "$OUT/serving.log"
"$PYTHON" -m scripts.benchmark --untrained resnet50 --precision bf16 --concurrency 32 --max-batch-size 32 \
    --seconds "$SECONDS_PER_POINT" --warmup 3 --env GPU_DECODE=true --out "$OUT/gpu-decode" > "$OUT/gpu-decode.log"
{
    echo; echo "## serving (untrained ResNet-50, 224 px; timing only)"; cat "$OUT/serving/benchmark.md"
    echo; echo "## GPU_DECODE=true (bf16)"; cat "$OUT/gpu-decode/benchmark.md"
} | tee -a "$OUT/summary.txt"
