#!/bin/sh
# Train a bundle into $MODEL_PATH unless one is already there, then write its ONNX Runtime graphs beside it
# (fp32, and int8 calibrated on the training data) unless they are there, so the CPU serves through ONNX Runtime.
# Trains on $DATA_DIR when it holds images (ImageFolder: train/ + val/, or class folders),
# else on generated demo data. Used by `make model` and by the compose `train` service.
# $DATA_DIR/demo is not user data: it is where `make run` puts the demo set (./data/demo), which the compose
# `train` service sees inside its ./data mount; hidden files (.gitkeep) do not count either.
# EXPORT_GRAPHS=false skips the graphs (PyTorch then serves: BACKEND=auto falls back and says so).
set -eu

MODEL_PATH=${MODEL_PATH:-models/pet_classifier.pt}
PYTHON=${PYTHON:-python}
DEMO_DIR=${DEMO_DIR:-data/demo}
DATA_DIR=${DATA_DIR:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
EXPORT_GRAPHS=${EXPORT_GRAPHS:-true}

has_data() {  # a file in folder $1 outside its demo/ folder and hidden entries
    [ -n "$1" ] || return 1
    dir=${1%/}
    [ -n "$(find "$dir" -mindepth 1 \( -path "$dir/demo" -o -name '.*' \) -prune -o -type f -print 2>/dev/null |
        head -n 1)" ]
}

if [ -f "$MODEL_PATH" ]; then
    echo "using existing bundle $MODEL_PATH"
    if has_data "$DATA_DIR"; then data=$DATA_DIR; elif has_data "$DEMO_DIR"; then data=$DEMO_DIR; else data=; fi
elif has_data "$DATA_DIR"; then
    echo "no bundle at $MODEL_PATH: training on $DATA_DIR"
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    "$PYTHON" scripts/train.py --data-dir "$DATA_DIR" --output "$MODEL_PATH" $TRAIN_ARGS
    data=$DATA_DIR
else
    echo "no bundle at $MODEL_PATH and no photos in '${DATA_DIR:-<unset>}' (its demo/ aside): training the demo model"
    [ -d "$DEMO_DIR/train" ] || "$PYTHON" scripts/make_demo_data.py --out "$DEMO_DIR"
    # shellcheck disable=SC2086
    "$PYTHON" scripts/train.py --demo --data-dir "$DEMO_DIR" --output "$MODEL_PATH" $TRAIN_ARGS
    data=$DEMO_DIR
fi

case "$EXPORT_GRAPHS" in false | 0 | no | off) exit 0 ;; esac
graph="${MODEL_PATH%.pt}.fp32.onnx"
if [ -f "$graph" ]; then
    echo "using existing graphs beside $MODEL_PATH (stale ones stop the server, naming scripts/export.py)"
elif [ -n "$data" ]; then
    echo "writing the ONNX Runtime graphs (fp32, int8 calibrated on $data) beside $MODEL_PATH"
    "$PYTHON" scripts/export.py --model "$MODEL_PATH" --data-dir "$data" >/dev/null
else
    echo "writing the fp32 ONNX Runtime graph beside $MODEL_PATH (no training data here to calibrate int8 on)"
    "$PYTHON" scripts/export.py --model "$MODEL_PATH" --precision fp32 >/dev/null
fi
