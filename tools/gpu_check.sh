#!/usr/bin/env bash
# The GPU check in one device call: python3 tools/gpu_check.py with the repository on PYTHONPATH.
#   bash tools/gpu_check.sh [--providers cpu,cuda,tensorrt] [--models default,gpt2-small]
#   bash tools/gpu_check.sh --stash-only     (a call that only carries one onnxruntime-gpu wheel part)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-$(command -v python3)}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
exec "$PYTHON" tools/gpu_check.py "$@"
