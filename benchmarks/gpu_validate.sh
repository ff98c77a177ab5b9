#!/usr/bin/env bash
# GPU validation on a CUDA machine: install, `attnkit info`, `attnkit check`, then the GPU test suite.
#   benchmarks/gpu_validate.sh OUT_DIR [extra pytest args]
# Writes OUT_DIR/validate.txt (everything) and prints a short summary last.
set -uo pipefail
out="${1:?usage: benchmarks/gpu_validate.sh OUT_DIR [pytest args]}"
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
log="$out/validate.txt"
{
    echo "# attnkit GPU validation, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -2
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 -c "import cupy; print('cupy', cupy.__version__)" 2>&1 | tail -1
    echo "## attnkit info"
    python3 -m attnkit info
    echo "## attnkit check"
    python3 -m attnkit check
    echo "check exit code: $?"
    echo "## pytest -m gpu"
    python3 -m pytest -m gpu tests -p no:cacheprovider -q -rfE "$@" 2>&1 | tail -40
} 2>&1 | tee "$log"
