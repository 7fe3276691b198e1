#!/bin/sh
# Make sure $MODEL_PATH holds a bundle that carries its ONNX Runtime graphs (fp32, and int8 calibrated on the
# training data), so the CPU serves through ONNX Runtime. Used by `make model` and by the compose `train` service.
#   - no bundle there: train one (training writes the graphs into it);
#   - RETRAIN=true: train a new one even so, on $DATA_DIR (else the demo data);
#   - BUNDLE_FROM=FILE: install that bundle (checked first; its graphs written into it if it has none);
#   - a bundle there: keep it; an older bundle with graphs beside it is upgraded into one file, and one that carries
#     no graphs gets them.
# A new bundle is made beside $MODEL_PATH under a temporary name and renamed over it: a server watching the file
# (MODEL_WATCH_S) or reloaded by HUP sees the old bundle or the new one, never half of one; a failure leaves the old.
# Trains on $DATA_DIR when it holds images (ImageFolder: train/ + val/, or class folders), else on generated demo
# data. $DATA_DIR/demo is not user data: it is where `make run` puts the demo set (./data/demo), which the compose
# `train` service sees inside its ./data mount; hidden files (.gitkeep) do not count either.
# EXPORT_GRAPHS=false writes no graphs (PyTorch then serves: BACKEND=auto falls back and says so).
set -eu

MODEL_PATH=${MODEL_PATH:-models/pet_classifier.pt}
PYTHON=${PYTHON:-python}
DEMO_DIR=${DEMO_DIR:-data/demo}
DATA_DIR=${DATA_DIR:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
EXPORT_GRAPHS=${EXPORT_GRAPHS:-true}
RETRAIN=${RETRAIN:-false}
BUNDLE_FROM=${BUNDLE_FROM:-}

has_data() {  # a file in folder $1 outside its demo/ folder and hidden entries
    [ -n "$1" ] || return 1
    dir=${1%/}
    [ -n "$(find "$dir" -mindepth 1 \( -path "$dir/demo" -o -name '.*' \) -prune -o -type f -print 2>/dev/null |
        head -n 1)" ]
}

is_true() { case "$1" in true | 1 | yes | on) return 0 ;; *) return 1 ;; esac; }

graphs=fp32,int8
is_true "$EXPORT_GRAPHS" || graphs=none
if has_data "$DATA_DIR"; then data=$DATA_DIR; elif has_data "$DEMO_DIR"; then data=$DEMO_DIR; else data=; fi
folder=$(dirname "$MODEL_PATH")
mkdir -p "$folder"
staging="$folder/.new-$$"  # on MODEL_PATH's file system, so that the last step is a rename
new="$staging/$(basename "$MODEL_PATH")"
trap 'rm -rf "$staging"' EXIT
mkdir "$staging"

install_new() {  # training's reports (history, curves, TensorBoard events) first, the bundle last, by renames
    [ -f "$new" ] || { echo "no bundle was written at $new; $MODEL_PATH is left as it was"; return 1; }
    for report in "$staging"/* "$staging"/.[!.]*; do
        [ -e "$report" ] && [ "$report" != "$new" ] || continue
        rm -rf "${folder:?}/$(basename "$report")"
        mv "$report" "$folder/"
    done
    mv -f "$new" "$MODEL_PATH"
}

train_into() {  # $1: the bundle to write
    if has_data "$DATA_DIR"; then
        echo "training on $DATA_DIR"
        # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
        "$PYTHON" scripts/train.py --data-dir "$DATA_DIR" --output "$1" --graphs "$graphs" $TRAIN_ARGS
    else
        echo "no photos in '${DATA_DIR:-<unset>}' (its demo/ aside): training the demo model"
        [ -d "$DEMO_DIR/train" ] || "$PYTHON" scripts/make_demo_data.py --out "$DEMO_DIR"
        data=$DEMO_DIR
        # shellcheck disable=SC2086
        "$PYTHON" scripts/train.py --demo --data-dir "$DEMO_DIR" --output "$1" --graphs "$graphs" $TRAIN_ARGS
    fi
}

add_graphs() {  # $1: a bundle that may carry no graphs, or have them beside it (format 1/2)
    is_true "$EXPORT_GRAPHS" || return 0
    state=$("$PYTHON" -c 'import sys; from models.graphs import graph_state; print(graph_state(sys.argv[1]))' "$1" ||
        echo unreadable)
    case "$state" in
    carried) echo "$1 carries its ONNX Runtime graphs" ;;
    beside)
        echo "moving the graphs beside $1 into it (scripts/export.py --upgrade)"
        "$PYTHON" scripts/export.py --model "$1" --upgrade >/dev/null
        ;;
    none)
        if [ -n "$data" ]; then
            echo "writing the ONNX Runtime graphs (fp32, int8 calibrated on $data) into $1"
            "$PYTHON" scripts/export.py --model "$1" --data-dir "$data" >/dev/null
        else
            echo "writing the fp32 ONNX Runtime graph into $1 (no training data here to calibrate int8 on)"
            "$PYTHON" scripts/export.py --model "$1" --precision fp32 >/dev/null
        fi
        ;;
    *) echo "$1 is not a model bundle"; return 1 ;;
    esac
}

check_bundle() {  # $1: refused with the loader's reason unless it is a complete, untampered bundle
    "$PYTHON" -c 'import sys
from models.bundle import BundleError, load_bundle
try:
    print(f"{sys.argv[1]}: a bundle of version {load_bundle(sys.argv[1]).version}")
except BundleError as error:
    sys.exit(f"refused: {error}")' "$1"
}

if [ -n "$BUNDLE_FROM" ]; then
    echo "installing $BUNDLE_FROM as $MODEL_PATH"
    cp "$BUNDLE_FROM" "$new"
    check_bundle "$new"  # a file that is no bundle stops here, and the old one stays
    add_graphs "$new"
    install_new
elif is_true "$RETRAIN" || [ ! -f "$MODEL_PATH" ]; then
    [ -f "$MODEL_PATH" ] && echo "RETRAIN=$RETRAIN: a new bundle replaces $MODEL_PATH once it is trained"
    train_into "$new"
    install_new
else
    echo "using existing bundle $MODEL_PATH"
    add_graphs "$MODEL_PATH"
fi
echo "bundle ready: $MODEL_PATH"
