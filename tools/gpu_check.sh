#!/usr/bin/env bash
# make gpu-check: run the whole CUDA path on a machine with an NVIDIA GPU, in at most 8 minutes.
#
#   make gpu-check [PYTHON=python3] [OUT=dir]
#
# Steps (each with its own time limit and log file in the output folder, $OUT or gpu-check-out/):
#   setup      a python with CuPy (the given one, else .venv's; cupy-cuda12x installed only if
#              neither has it) and arraybn installed into it (pip -e . --no-deps)
#   info       arraybn info (is the cupy backend usable, and if not, why)
#   pytest     pytest -m gpu: the kernels, the BN core and the subnormal cases on the GPU
#   benchmark  benchmarks/bn_kernels_cuda.py (arraybn vs cuDNN), short
#   train      arraybn run --backend cupy --augment --augment-crop 2, 1 epoch on a 4096-image
#              Fashion-MNIST subset (a generated MNIST-format set when the dataset is not installed)
# summary.txt lists every step with its exit code and seconds. Exits non-zero if any step
# failed, and at once with "no CUDA GPU" on a machine without one.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-gpu-check-out}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

has_gpu() {
  { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; } \
    || [ -e /dev/nvidia0 ]
}

if ! has_gpu; then
  note "gpu-check: no CUDA GPU on this machine (nvidia-smi lists none, no /dev/nvidia0);" \
       "run it where an NVIDIA GPU and its driver are installed"
  exit 2
fi

# step NAME SECONDS COMMAND...: run with a time limit, log to $OUT_DIR/NAME.log, record the result
step() {
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAILED"
  [ $rc -ne 0 ] && FAILED=1
  note "$(printf '%-10s %-22s exit %3d  %4ds  log: %s' "$name" "$verdict" "$rc" \
         "$((SECONDS - started))" "$OUT_DIR/$name.log")"
  return $rc
}

has_cupy() { "$1" -c "import cupy" >/dev/null 2>&1; }

choose_python() {
  local candidate
  for candidate in "${PYTHON:-python3}" .venv/bin/python; do
    if [ -x "$(command -v "$candidate")" ] && has_cupy "$candidate"; then
      echo "$candidate"; return 0
    fi
  done
  candidate=${PYTHON:-python3}
  echo "no python with CuPy: installing cupy-cuda12x into $candidate" >&2
  "$candidate" -m pip install -q cupy-cuda12x >&2 && has_cupy "$candidate" && echo "$candidate"
}

setup() {
  PY=$(choose_python) || { echo "no python with CuPy and cupy-cuda12x would not install"; return 1; }
  echo "python: $PY ($("$PY" --version 2>&1)); cupy $("$PY" -c 'import cupy; print(cupy.__version__)')"
  nvidia-smi -L || true
  # a venv's python (the GPU image's python3 is one) installs as is; a distribution's python
  # marked EXTERNALLY-MANAGED needs the override, which only adds an editable link to this tree
  { "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
      || "$PY" -m pip install -q --no-deps --no-build-isolation --break-system-packages -e .; } \
    && "$PY" -c "import arraybn, arraybn.cuda, arraybn_cli; print('arraybn', arraybn.__version__)"
}

cli() { "$PY" -c "from arraybn_cli.main import cli; cli()" "$@"; }

dataset_dir() {
  local installed=/usr/share/datasets/fashion-mnist
  if [ -f "$installed/train-images-idx3-ubyte.gz" ]; then echo "$installed"; return; fi
  "$PY" -c "
import sys; from pathlib import Path
from tests.data.idx_files import write_dataset
print(write_dataset(Path(sys.argv[1]), n_train=6000, n_test=1000, size=28))" "$OUT_DIR/data"
}

train() {
  local data
  data=$(dataset_dir) || return 1
  echo "dataset: $data"
  cli run "$OUT_DIR/run" --force --backend cupy --epochs 1 --train-subset 4096 \
    --augment --augment-crop 2 --data-dir "$data"
}

export -f has_cupy choose_python setup cli dataset_dir train    # run by bash -c under timeout
export OUT_DIR PYTHON="${PYTHON:-}"
export ARRAYBN_CUDA_CACHE="$OUT_DIR/kernel-cache"     # a cold build: create() compiles
# Limits add up to 7.5 minutes.
step setup 60 setup || { note "gpu-check: setup failed, see $OUT_DIR/setup.log"; exit 1; }
PY=$(sed -n 's/^python: \([^ ]*\) .*/\1/p' "$OUT_DIR/setup.log")
export PY
step info 30 cli info
step pytest 180 "$PY" -m pytest -q -rf -m gpu -p no:cacheprovider --maxfail=25 tests/
step benchmark 60 "$PY" benchmarks/bn_kernels_cuda.py --repeats 20 --warmup 3
step train 120 train
note "gpu-check: $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'some steps FAILED')"
exit $FAILED
