#!/bin/sh
# Train a bundle into $MODEL_PATH unless one is already there.
# Trains on $DATA_DIR when it holds images (ImageFolder: train/ + val/, or class folders),
# else on generated demo data. Used by `make run` and by the compose `train` service.
# $DATA_DIR/demo is not user data: it is where `make run` puts the demo set (./data/demo), which the compose
# `train` service sees inside its ./data mount; hidden files (.gitkeep) do not count either.
set -eu

MODEL_PATH=${MODEL_PATH:-models/pet_classifier.pt}
PYTHON=${PYTHON:-python}
DEMO_DIR=${DEMO_DIR:-data/demo}
DATA_DIR=${DATA_DIR:-}
TRAIN_ARGS=${TRAIN_ARGS:-}

if [ -f "$MODEL_PATH" ]; then
    echo "using existing bundle $MODEL_PATH"
    exit 0
fi

user_data() {  # the first file of $DATA_DIR outside demo/ and hidden entries, if any
    [ -n "$DATA_DIR" ] || return 0
    dir=${DATA_DIR%/}
    find "$dir" -mindepth 1 \( -path "$dir/demo" -o -name '.*' \) -prune -o -type f -print 2>/dev/null |
        head -n 1
}

if [ -n "$(user_data)" ]; then
    echo "no bundle at $MODEL_PATH: training on $DATA_DIR"
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    exec "$PYTHON" scripts/train.py --data-dir "$DATA_DIR" --output "$MODEL_PATH" $TRAIN_ARGS
fi

echo "no bundle at $MODEL_PATH and no photos in '${DATA_DIR:-<unset>}' (its demo/ aside): training the demo model"
[ -d "$DEMO_DIR/train" ] || "$PYTHON" scripts/make_demo_data.py --out "$DEMO_DIR"
# shellcheck disable=SC2086
exec "$PYTHON" scripts/train.py --demo --data-dir "$DEMO_DIR" --output "$MODEL_PATH" $TRAIN_ARGS
