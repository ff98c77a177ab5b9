#!/usr/bin/env bash
# GPU validation on a CUDA machine in one command: install, `attnkit info`, then `attnkit check` and every GPU test
# side by side on the same GPU (correctness only, nothing timed): every GPU test but CuPy's (Triton kernels, every
# autotune tile, the full grid, KV cache, frontend) in TEST_PROCS parallel shards (their run time is mostly
# compilation), the CuPy GPU tests (tests/cupy), and the differential fuzzer for FUZZ_SECONDS (default 300) in FUZZ_PROCS
# processes (default 6). PRECOMPILE_PROCS (default 16) first builds the CuPy kernels in parallel.
#   benchmarks/gpu_validate.sh OUT_DIR
# PART=triton runs only `attnkit check` and the shards, PART=rest only the CuPy tests and the fuzzer: the whole job
# no longer fits one 600 s device call (2026-12-02: the shards alone took ~440 s on 12 processes).
# Writes OUT_DIR/validate.txt (environment, exit codes, pass/fail lines) and one log per job: check.txt,
# triton_gpu.txt, cupy_gpu.txt, fuzz.txt. Exits non-zero when any job failed.
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

# On a cold machine the CuPy kernels compile one at a time inside the test process (tens of seconds each for the
# warp-specialised ones); PRECOMPILE_PROCS=N (default 16, 0 to skip) builds them first in N processes.
if [ "${PRECOMPILE_PROCS:-16}" -gt 0 ] && [ "${PART:-all}" != triton ]; then
    python3 benchmarks/cupy_precompile.py --procs "${PRECOMPILE_PROCS:-16}" >"$out/precompile.txt" 2>&1
    echo "cupy precompile: exit $?; $(tail -1 "$out/precompile.txt")" >>"$log"
fi

shards="$out/triton_shards"
mkdir -p "$shards"
start=$(date +%s)
part="${PART:-all}"
skip() { echo "not run (PART=$part)" >"$1"; }
if [ "$part" != rest ]; then
    python3 -m attnkit check >"$out/check.txt" 2>&1 &
    pid_check=$!
    OUT="$shards" python3 benchmarks/triton_dev.py gputests --procs "${TEST_PROCS:-10}" >"$shards/summary.txt" 2>&1 &
    pid_triton=$!
else
    skip "$out/check.txt"; pid_check=""; pid_triton=""
fi
if [ "$part" != triton ]; then
    python3 -m pytest -m gpu tests/cupy -q -p no:cacheprovider -rfE >"$out/cupy_gpu.txt" 2>&1 &
    pid_cupy=$!
    python3 -m attnkit check --fuzz "${FUZZ_SECONDS:-300}" --fuzz-procs "${FUZZ_PROCS:-6}" >"$out/fuzz.txt" 2>&1 &
    pid_fuzz=$!
else
    skip "$out/cupy_gpu.txt"; skip "$out/fuzz.txt"; pid_cupy=""; pid_fuzz=""
fi
waited() { if [ -n "$1" ]; then wait "$1"; else return 0; fi; }
waited "$pid_check"; rc_check=$?
waited "$pid_triton"; rc_triton=$?
waited "$pid_cupy"; rc_cupy=$?
cat "$shards"/gputests_*.log >"$out/triton_gpu.txt" 2>/dev/null
rm -rf "$shards"
tests_s=$(( $(date +%s) - start ))
waited "$pid_fuzz"; rc_fuzz=$?

count() { grep -hoE '[0-9]+ (passed|failed|error|errors|skipped)' "$1" | awk '{n[$2]+=$1} END {for (k in n) printf "%s %s, ", n[k], k}'; }
{
    echo "## results (tests: $tests_s s for the three test jobs, beside the fuzzer's ${FUZZ_SECONDS:-300} s)"
    echo "attnkit check: exit $rc_check; $(grep -E '[0-9]+ passed' "$out/check.txt" | tail -1)"
    echo "GPU tests but CuPy's (shards): exit $rc_triton; $(count "$out/triton_gpu.txt")"
    grep -hE '^(FAILED|ERROR)' "$out/triton_gpu.txt" | head -40
    echo "cupy GPU tests: exit $rc_cupy; $(grep -E '[0-9]+ (passed|failed)' "$out/cupy_gpu.txt" | tail -1)"
    grep -hE '^(FAILED|ERROR)' "$out/cupy_gpu.txt" | head -20
    echo "fuzz: exit $rc_fuzz"
    sed -n '/^backend /,$p' "$out/fuzz.txt"
    grep -E '^FAIL ' "$out/fuzz.txt" | head -20
} >>"$log"
sed -n '/^## results/,$p' "$log"
exit $(( rc_check || rc_triton || rc_cupy || rc_fuzz ))
