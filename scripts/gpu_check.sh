#!/usr/bin/env bash
# Everything the CUDA backend still needs a GPU for, in one call of the device tool:
#   build safekern._C, run the GPU tests, compute-sanitizer (memcheck + racecheck) on the cuda
#   tests, then the benchmarks with the cuda backend included. Logs and CSVs go to $OUT.
#
#   run(command="STAGES='build tests' bash scripts/gpu_check.sh", timeout_s=600)   # device tool
#   run(command="STAGES='build sanitize bench' bash scripts/gpu_check.sh")        # next call
#   OUT=gpu_out bash scripts/gpu_check.sh                      # any CUDA machine, all stages
#
# Each step has its own time limit and the script goes on after a failure, so one call
# returns everything; $OUT/summary.txt lists each step's exit status (0 = passed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MAX_JOBS=${MAX_JOBS:-16}
# The lent GPUs are Hopper; CI compiles sm_80 too (tests/test_cuda_compile.py).
export SAFEKERN_CUDA_ARCHS=${SAFEKERN_CUDA_ARCHS:-90a}
: >> "$OUT/summary.txt"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%-16s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
  return $rc
}

{
  nvidia-smi
  nvcc --version
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name())"
  command -v compute-sanitizer
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

build() {  # pip with the installed (CUDA) torch; in place as a fallback (same setup.py)
  if ! step build 300 $PY -m pip install --no-build-isolation --no-deps -v -e . ||
     ! $PY -c "import safekern._C" 2>/dev/null; then
    step build_inplace 300 $PY setup.py build_ext --inplace
  fi
  step import 60 $PY -c "import safekern._C, torch; from safekern.ops import cuda_backend as c
assert c.extension_error() is None, c.extension_error(); print(torch.ops.safekern.cuda_head_sample)"
}

tests() {  # the cuda backend against the reference, then every GPU test of the project
  step test_cuda 240 $PY -m pytest -q tests/test_cuda_backend.py tests/test_cuda_compile.py \
    --junitxml="$OUT/test_cuda.xml"
  step test_gpu_all 300 $PY -m pytest -q -m gpu tests --junitxml="$OUT/test_gpu_all.xml"
}

sanitize() {
  # Without the caching allocator every tensor is its own allocation, so an out-of-bounds
  # access is reported instead of landing in a neighbouring pooled block.
  step memcheck 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --error-exitcode 1 --print-limit 20 $PY -m pytest -q tests/test_cuda_backend.py -k \
    "decode_step and (97 or 1000) or strided or zero or position_zero or split_count or \
plain_causal or greedy_tokens and 111 or two_class or state_transitions and medium"
  step racecheck 240 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
    $PY -m pytest -q tests/test_cuda_backend.py -k \
    "decode_step and 97 and 64 and float16 or split_count and 7 or greedy_tokens and 111 and float16"
  step synccheck 120 compute-sanitizer --tool synccheck --error-exitcode 1 \
    $PY -m pytest -q tests/test_cuda_backend.py -k "decode_step and 97 and 128 and bfloat16"
}

bench() {  # cuda vs triton vs torch on decode shapes (fills AUTO_TABLE), then the project's
  step bench_cuda 300 $PY benchmarks/bench_cuda_decode.py --out "$OUT"
  for b in benchmarks/bench_attention.py benchmarks/bench_head_sample.py; do
    [ -f "$b" ] && step "$(basename "$b" .py)" 240 $PY "$b"
  done
}

# All stages take about 10 minutes; on the device tool (600 s a call, build outputs kept while
# the machine stays warm) run e.g. "build tests" in one call and "sanitize bench" in the next.
for stage in ${STAGES:-build tests sanitize bench}; do
  "$stage"
done

echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
! grep -qv 'rc=0 ' "$OUT/summary.txt"
