#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): quick pipeline, bf16 training MFU, Serve throughput.
#   bash benchmarks/gpu_check.sh [--short] [--out DIR]
# Under 8 minutes on one H100/H200; on a machine without CUDA it runs on the CPU and prints
# SKIP for the GPU-only figures. The last line is one JSON object with every figure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0
exec timeout "${GPU_CHECK_TIMEOUT_S:-900}" python3 benchmarks/gpu_check.py "$@"
