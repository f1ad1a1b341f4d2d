#!/usr/bin/env bash
# The GPU check of issue 14: every kernel and two whole models on the GPU against CPU references, and
# the four kernels timed against cuBLAS dense. Two halves:
#
#   bash benchmarks/gpu_check.sh prepare [ARGS]   here (torch, apache-tvm, nvcc; no GPU needed): compiles for
#                                                 "cuda -arch=sm_90" and fills benchmarks/gpu_carry/ (< 64 MiB)
#   bash benchmarks/gpu_check.sh [OUT]            on the GPU machine (Python 3.12 with a CUDA torch, no TVM),
#                                                 from the repository root with benchmarks/gpu_carry/ beside it:
#                                                 writes OUT/log.txt, OUT/table.md, OUT/results.json (OUT
#                                                 defaults to $OUT, then benchmarks/gpu_out)
#
# With the session's device tool: run `bash benchmarks/gpu_check.sh "$OUT"` with carry ["benchmarks/gpu_carry"]
# (49 MiB of the 64 MiB a run may carry); the three files come back from $OUT.
#
# The second half imports tvm, tvm_ffi and structfx's runtime from gpu_carry/site only (runtime-only TVM:
# libtvm_compiler.so is not there), and numpy and torch from the machine. Exit status: 0 when every run
# is within tolerance.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=benchmarks/gpu_carry
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "prepare" ]]; then
    shift
    exec "${PREPARE_PYTHON:-.venv/bin/python}" benchmarks/gpu_check/prepare.py --out "$CARRY" "$@"
fi

OUT_DIR=${1:-${OUT:-benchmarks/gpu_out}}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT_DIR"
[[ -f "$CARRY/plan.json" ]] || { echo "no $CARRY/plan.json: run 'bash $0 prepare' first" >&2; exit 2; }
export PYTHONPATH="$PWD/$CARRY/site"
export TVM_USE_RUNTIME_LIB=1
# TVM's CUDA runtime links libcudart.so.13: the machine's own first, the carried copy last
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$PWD/$CARRY/lib"
if ! "$PYTHON" -c "import numpy" 2>/dev/null; then
    for wheel in "$CARRY"/wheels/numpy-*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$CARRY/numpy_site"; done
    export PYTHONPATH="$PYTHONPATH:$PWD/$CARRY/numpy_site"
fi
{
    echo "== $(date -u) on $(hostname)"
    "$PYTHON" --version
    if [[ "$DEVICE" == cuda ]]; then nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv || true; fi
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"
"$PYTHON" benchmarks/gpu_check/check.py --carry "$CARRY" --out "$OUT_DIR" --device "$DEVICE" "${@:2}"
