#!/usr/bin/env bash
# The full GPU benchmark (see benchmarks/run_gpu.py) under a hard wall-clock limit.
#   benchmarks/run_gpu.sh OUT_DIR [run_gpu.py options]
# The Python side stops starting cases at --time-budget (330 s); if it still runs at 400 s it gets SIGINT, saves
# what it has and exits; at 430 s it is killed (results are rewritten after every case, so files stay complete).
set -euo pipefail
out="${1:?usage: benchmarks/run_gpu.sh OUT_DIR [options]}"
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
# attnkit.backends lives in backends/ and only resolves through the (editable) install; install it offline if absent.
if ! python3 -c "import attnkit.backends.reference" 2>/dev/null; then
    python3 -m pip install --quiet --no-deps --no-build-isolation -e . >/tmp/attnkit-install.log 2>&1 || true
fi
python3 -c "import matplotlib" 2>/dev/null || echo "matplotlib missing: no PNGs; later: attnkit bench --plot-from $out/results.json"
exec timeout --signal=INT --kill-after=30 400 python3 benchmarks/run_gpu.py --out "$out" "$@"
