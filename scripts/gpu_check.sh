#!/usr/bin/env bash
# One GPU check (at most 8 minutes on one GPU; tiny locally built models; nothing downloaded):
# vLLM teacher via ray.data.llm, bf16 ZeRO-2/3 on nccl, LoRA + QLoRA, GPU serving (transformers
# and ray.serve.llm). Writes <out>/gpu_check.{json,md}: versions, device, figures, pass/fail/skip per step.
#   bash scripts/gpu_check.sh [OUT_DIR]          # on a GPU node
#   bash scripts/gpu_check.sh OUT_DIR --cpu      # the steps with a CPU variant, on CPU (fp32, gloo)
#   bash scripts/gpu_check.sh OUT_DIR --only generate_vllm,serve_vllm   # a subset (env + models always run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_results}"; shift || true
# .venv (scripts/setup.sh), else the image's python3 (GPU images often have no plain `python`)
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || echo python )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1
timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-480}" "$PY" scripts/gpu_check.py --out "$OUT" "$@"
rc=$?
[ $rc -eq 124 ] && echo "[gpu_check] stopped at the time limit; the steps that ran are in $OUT/gpu_check.md"
exit $rc
