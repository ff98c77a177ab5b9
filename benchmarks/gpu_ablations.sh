#!/usr/bin/env bash
# The CuPy kernels' ablations against their defaults, in one device call (under its 600 s limit):
# correctness first, then timing, each step capped by what is left of BUDGET seconds (default 565).
#   benchmarks/gpu_ablations.sh OUT_DIR
# Steps (each writes OUT_DIR/<step>.txt; OUT_DIR/steps.txt has their exit codes and times):
#   precompile         every CuPy module the steps below use, in 16 processes
#   ws_bwd_tests       the warp-specialised backward's GPU tests, every WS_BWD_ABLATIONS schedule included
#   ws_bwd_bench       the backward's default (the wide step with early dV and the 16-bit dS^T factor) against
#                      the 64-query step with the fp32 factor, the wide steps in the overlap schedule (128
#                      queries at d64, 80 at d128) and SDPA-cuDNN (bwd/results.md)
#   fp8_ablate         the fp8 forward's variants, poly-exp included (fp8_ablate/)
#   fp8_variant_tests  every fp8 variant against the accuracy bound
#   ws_fwd_bench       the 16-bit WS forward and its ablations, poly-exp included (fwd/)
#   hostpath_tests     the Triton host path's GPU tests
# OUT_DIR/logs.tgz packs everything (the device tool returns a limited number of files).
set -u
out="$(mkdir -p "${1:?usage: benchmarks/gpu_ablations.sh OUT_DIR}" && cd "$1" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
budget=${BUDGET:-565}
t0=$(date +%s)
left() { echo $((budget - ($(date +%s) - t0))); }
step() {  # name, cap in seconds, command...
    local name=$1 cap=$2 rest t
    shift 2
    rest=$(left)
    if [ "$rest" -lt 20 ]; then echo "$name: not run, $rest s left" >>"$out/steps.txt"; return; fi
    [ "$cap" -gt "$rest" ] && cap=$rest
    t=$(date +%s)
    timeout "$cap" "$@" >"$out/$name.txt" 2>&1
    echo "$name: exit $? after $(($(date +%s) - t)) s (cap $cap s)" >>"$out/steps.txt"
}
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -1
    python3 -c "import torch, triton, cupy; print('torch', torch.__version__, 'triton', triton.__version__, 'cupy', cupy.__version__)"
} >"$out/env.txt" 2>&1
step precompile 150 python3 benchmarks/cupy_precompile.py --procs 16
step ws_bwd_tests 150 python3 -m pytest -m gpu tests/cupy/test_cupy_ws_bwd_gpu.py -q -p no:cacheprovider -rfE -x
step ws_bwd_bench 210 python3 benchmarks/cupy_ws_bwd_bench.py --out "$out/bwd" --impls ws ws_bm64 ws_bm128 ws_bm80 sdpa_cudnn \
    --seqlens 4096 8192 16384 --rounds 5
step fp8_ablate 100 python3 benchmarks/fp8_bench.py ablate --out "$out/fp8_ablate"
step fp8_variant_tests 60 python3 -m pytest -m gpu tests/cupy/test_cupy_fp8_gpu.py -q -p no:cacheprovider -rfE \
    -k ablation
step ws_fwd_bench 100 python3 benchmarks/cupy_ws_bench.py --out "$out/fwd" --quick
step hostpath_tests 60 python3 -m pytest -m gpu tests/triton/test_triton_hostpath_gpu.py -q -p no:cacheprovider -rfE
cat "$out/steps.txt"
(cd "$out" && tar czf logs.tgz -- *.txt bwd fwd fp8_ablate 2>/dev/null)
