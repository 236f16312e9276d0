#!/usr/bin/env bash
# The full (non-quick) runs behind docs/results: fit both bias curves of the default configuration,
# then the 300-question position sweep and QA benchmark. Runs anywhere; on the 2-core CPU it takes
# hours, on a GPU minutes.
#   eval/full_runs.sh DATA_DIR OUT_DIR [PYTHON]
set -euo pipefail
data=${1:?data dir}; out=${2:?output dir}; py=${3:-python}
mkdir -p "$out"
"$py" -m rerank.calibrate --config configs/fit-curve-raw.yaml --data-dir "$data" --out "$out/smollm2-135m-raw.json"
# The default's curve: per-slot offsets from a sweep over the first dev questions (the shipped store's
# count; questions already in the store are read from it, not probed again).
"$py" -m rerank.calibrate --config configs/fit-curve-nacal.yaml --data-dir "$data" --out "$out/smollm2-135m-nacal.json" \
  --equalise-questions "${EQUALISE_QUESTIONS:-209}" --sweep-store calibration/curves/smollm2-135m-nacal.sweep.npz
"$py" -m eval position --data-dir "$data" --output "$out/position.json" \
  --opt curve_raw="$out/smollm2-135m-raw.json" --opt curve_nacal="$out/smollm2-135m-nacal.json"
"$py" -m eval qa --data-dir "$data" --output "$out/qa.json" --opt batch_size=32 \
  --opt curve="$out/smollm2-135m-raw.json"
