#!/usr/bin/env bash
# GPU check, under 5 minutes, installing nothing: the tests marked gpu, then the GPU
# benchmarks (STDP training ms/image and inference images/s for 300 neurons; all-pairs
# similarity of 10,000 neurons per metric), then their figures.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
#
# Assumes an environment with the project and CuPy installed (.venv by default). Exits 2
# with the reason when no GPU is usable, 1 when a step failed, 0 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$OUT"' EXIT

if ! why=$("$PY" -c 'from estdp.backend import resolve_backend; resolve_backend("cupy")' 2>&1); then
    echo "gpu_check: no usable GPU: ${why##*$'\n'}" >&2
    exit 2
fi
"$PY" -c 'import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); print("gpu_check: device", p["name"].decode() if isinstance(p["name"], bytes) else p["name"], "| CuPy", cupy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())'

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, keep the output, record failure
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    if ! timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "gpu_check: $name FAILED (or ran past ${limit}s)" >&2
        status=1
    fi
}

step tests 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider
step stdp 60 "$PY" benchmarks/bench_stdp_gpu.py --neurons 300 --images 2000 --infer-images 10000 --repeat 3
step similarity 60 "$PY" benchmarks/bench_similarity_gpu.py --neurons 10000 --repeat 3

echo "== figures"
grep -E '^[0-9]+ (passed|failed)|passed|failed' "$OUT/tests.log" | tail -n 1 || true
for name in stdp similarity; do
    if [ -s "$OUT/$name.log" ]; then tail -n 1 "$OUT/$name.log"; fi
done
if [ "$status" -ne 0 ]; then echo "gpu_check: some steps failed" >&2; fi
exit "$status"
