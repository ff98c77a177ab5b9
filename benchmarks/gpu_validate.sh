#!/usr/bin/env bash
# GPU validation on a CUDA machine in one command (about 5-8 minutes on an H100/H200): install, `attnkit info`,
# then `attnkit check` and every GPU test module side by side on the same GPU (correctness only, nothing timed):
# the Triton module in parallel shards (its run time is mostly compilation), the CuPy module, the KV-cache one.
#   benchmarks/gpu_validate.sh OUT_DIR
# Writes OUT_DIR/validate.txt (environment, exit codes, pass/fail lines) and one log per job: check.txt,
# triton_gpu.txt, cupy_gpu.txt, kvcache_gpu.txt.
set -uo pipefail
out="$(mkdir -p "${1:?usage: benchmarks/gpu_validate.sh OUT_DIR}" && cd "$1" && pwd)"
cd "$(dirname "$0")/.."
# attnkit.backends resolves through the checkout's attnkit/__init__ fallback as well as through an install.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
log="$out/validate.txt"
{
    echo "# attnkit GPU validation, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 -c "import cupy; print('cupy', cupy.__version__)" 2>&1 | tail -1
    echo "## attnkit info"
    python3 -m attnkit info
} >"$log" 2>&1

shards="$out/triton_shards"
mkdir -p "$shards"
start=$(date +%s)
python3 -m attnkit check >"$out/check.txt" 2>&1 &
pid_check=$!
OUT="$shards" python3 benchmarks/triton_dev.py gputests --procs 6 >"$shards/summary.txt" 2>&1 &
pid_triton=$!
python3 -m pytest -m gpu tests/cupy/test_cupy_gpu.py -q -p no:cacheprovider -rfE >"$out/cupy_gpu.txt" 2>&1 &
pid_cupy=$!
python3 -m pytest -m gpu tests/triton/test_triton_kvcache.py -q -p no:cacheprovider -rfE >"$out/kvcache_gpu.txt" 2>&1 &
pid_kv=$!
wait $pid_check; rc_check=$?
wait $pid_triton; rc_triton=$?
wait $pid_cupy; rc_cupy=$?
wait $pid_kv; rc_kv=$?
cat "$shards"/gputests_*.log >"$out/triton_gpu.txt" 2>/dev/null
rm -rf "$shards"

{
    echo "## results ($(( $(date +%s) - start )) s for the four jobs together)"
    echo "attnkit check: exit $rc_check; $(grep -E '[0-9]+ passed' "$out/check.txt" | tail -1)"
    echo "triton GPU tests (shards): exit $rc_triton; $(grep -hE '^[0-9]+ (passed|failed)|^(FAILED|ERROR)' "$out/triton_gpu.txt" | tr '\n' ' ')"
    echo "cupy GPU tests: exit $rc_cupy; $(grep -E '[0-9]+ (passed|failed)' "$out/cupy_gpu.txt" | tail -1)"
    echo "kvcache GPU tests: exit $rc_kv; $(grep -E '[0-9]+ (passed|failed)' "$out/kvcache_gpu.txt" | tail -1)"
} >>"$log"
tail -6 "$log"
