#!/usr/bin/env bash
# GPU check for a short lease (<= 6 minutes on one GPU): environment, meta-layer benchmark (the root given a
# covariance, and cov_pool on the Gram and the covariance path), model benchmark and the CUDA-marked tests, every
# result written into one folder.
#
# Usage: bash scripts/gpu_check.sh [--dry-run] [OUT_DIR]
#   OUT_DIR defaults to $OUT when set, else gpu_results/. --dry-run prints the steps and their time limits only.
#   PYTHON names the interpreter (default: python); the checkout goes first on PYTHONPATH, nothing is installed.
# Each step has its own timeout; a failing step is recorded in OUT_DIR/summary.txt and the next step still runs.
# The exit status is 0 only when every step passed.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
RESULTS="${1:-${OUT:-gpu_results}}"
PY="${PYTHON:-python}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

ENV_CMD="(command -v nvidia-smi >/dev/null && nvidia-smi || echo 'nvidia-smi not found'); $PY -c 'import torch, timm; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"timm\", timm.__version__, \
\"gpu\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'"
BENCH_CMD="$PY scripts/benchmark.py --device cuda --amp --batch-size 64 --rounds 10 --warmup 3 \
--csv \"\$RESULTS/benchmark.csv\" --markdown \"\$RESULTS/benchmark.md\""

# name | timeout (s) | command (run with bash -c; $RESULTS is the output folder)
STEPS=(
    "env|30|$ENV_CMD"
    "meta_layers|80|$PY scripts/bench_meta_layers.py --quick"
    "gram_path|60|$PY scripts/bench_meta_layers.py --pooling --batch 32 --samples 49 196 --repeats 5"
    "model_benchmark|130|$BENCH_CMD"
    "pytest_cuda|60|$PY -m pytest -q -o addopts=-ra -m cuda -p no:cacheprovider"
)

if [[ $DRY_RUN == 1 ]]; then
    echo "gpu_check: results would go to $RESULTS"
    total=0
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit cmd <<< "$step"
        printf '%-16s %4ss  %s\n' "$name" "$limit" "$cmd"
        total=$((total + limit))
    done
    echo "total time limit: ${total}s"
    exit 0
fi

mkdir -p "$RESULTS"
export RESULTS
SUMMARY="$RESULTS/summary.txt"
echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) host $(hostname)" > "$SUMMARY"
failed=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    echo "== $name (limit ${limit}s)"
    start=$(date +%s)
    rc=0
    timeout --kill-after=10 "$limit" bash -c "$cmd" > "$RESULTS/$name.log" 2>&1 || rc=$?
    secs=$(( $(date +%s) - start ))
    tail -n 25 "$RESULTS/$name.log" || true
    if [[ $rc == 0 ]]; then status=ok; elif [[ $rc == 124 || $rc == 137 ]]; then status=TIMEOUT
    elif [[ $name == pytest_cuda && $rc == 5 ]]; then status=NO_TESTS; else status=FAILED; fi
    [[ $rc == 0 ]] || failed=1
    printf '%-16s %-8s rc=%-4s %4ss\n' "$name" "$status" "$rc" "$secs" | tee -a "$SUMMARY"
done
echo "results in $RESULTS"
exit $failed
