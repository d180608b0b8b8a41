#!/usr/bin/env bash
# Create .venv and install divconq for CPU (torch pinned to the CPU wheel via constraints/cpu.txt).
# GPU nodes: `pip install -e '.[gpu]'` in an environment that already has a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first (CPU wheel), then DeepSpeed built against it without an isolated build env
# (an isolated build would fetch a second, CUDA torch), then the project with its extras.
$PIP install -q -c constraints/cpu.txt torch==2.13.0
DS_BUILD_OPS=0 $PIP install -q -c constraints/cpu.txt --no-build-isolation "deepspeed>=0.15"
$PIP install -q -c constraints/cpu.txt -e ".[dev]"
$PIP check
echo "divconq installed in $VENV"
