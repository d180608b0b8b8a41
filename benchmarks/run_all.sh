#!/usr/bin/env bash
# Run every benchmark, one after another (they share the machine's cores, so never in parallel).
#   bash benchmarks/run_all.sh            # full runs (about 8.5 minutes on 2 idle cores)
#   bash benchmarks/run_all.sh --quick    # quick runs (about 4.5 minutes)
#   bash benchmarks/run_all.sh --quick bench_serving bench_training   # a subset
# Results: benchmarks/results/<name>.{json,md,png}; per-script timings: benchmarks/results/run_all.log
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python

MODE=()
NAMES=()
for a in "$@"; do
  case "$a" in
    --quick) MODE=(--quick) ;;
    *) NAMES+=("$a") ;;
  esac
done
if [ ${#NAMES[@]} -eq 0 ]; then
  NAMES=(bench_inference_cost bench_teacher_generation bench_scaling bench_local_generation bench_serving bench_training bench_train_fixed_cost bench_hf_trainer bench_rate_limit bench_batch_vs_online bench_storage)
fi

mkdir -p benchmarks/results
LOG=benchmarks/results/run_all.log
echo "run_all ${MODE[*]:-full} $(date -Is)" >"$LOG"
failed=0
all_start=$(date +%s)
for name in "${NAMES[@]}"; do
  start=$(date +%s)
  echo "==== $name ${MODE[*]:-} ===="
  if "$PY" -m "benchmarks.$name" "${MODE[@]}"; then status=ok; else status=FAILED; failed=1; fi
  secs=$(( $(date +%s) - start ))
  echo "$name ${MODE[*]:-full}: $status in ${secs}s" | tee -a "$LOG"
done
total=$(( $(date +%s) - all_start ))
echo "total: ${total}s" | tee -a "$LOG"
exit $failed
