#!/usr/bin/env bash
# The GPU correctness checks in parallel on one machine (they are mostly compile- and
# reference-bound, so several pytest processes share the GPU well): the GPU suite in two halves,
# the fuzz tests in $FUZZ_PARTS parts, and the memcheck run. Not for benchmarks (they need a quiet
# GPU). Logs under $OUT; a summary line per job at the end. Run after device_session.sh installed
# the package (STEPS=none). Usage: LIMIT=480 FUZZ_PARTS=4 bash benchmarks/gpu_check_parallel.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
LIMIT=${LIMIT:-480}
FUZZ_PARTS=${FUZZ_PARTS:-4}
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2} PYTHONUNBUFFERED=1
pids=()
run() {  # name, command...
  local name=$1; shift
  ( timeout "$LIMIT" "$@" >"$OUT/$name.log" 2>&1; echo "exit $?" >>"$OUT/$name.log" ) &
  pids+=($!)
}
run suite-a python3 -m pytest -q -m "gpu and not fuzz" tests/ -rfEs --tb=short --durations=5 \
  --deselect tests/test_gpu_compile.py --deselect tests/test_gpu_features.py --deselect tests/test_gpu_fa4.py
run suite-b python3 -m pytest -q -m "gpu and not fuzz" tests/test_gpu_compile.py tests/test_gpu_features.py -rfEs --tb=short --durations=5
for ((part = 0; part < FUZZ_PARTS; part++)); do
  run "fuzz-$part" python3 -m pytest -q -m fuzz tests/test_fuzz_gpu.py -rfE --tb=line --fuzz-part "$part/$FUZZ_PARTS"
done
PYTORCH_NO_CUDA_MEMORY_CACHING=1 TORCHINDUCTOR_COMPILE_THREADS=1 run memcheck \
  compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 python3 -m pytest -q -m gpu \
  ${MEMCHECK_TESTS:-tests/test_gpu.py tests/test_gpu_compile.py} \
  -k "${MEMCHECK_K:-not training and not autotune and not cuda_graphs and not 100_batches}" -rfE --tb=short
wait "${pids[@]}"
for log in "$OUT"/suite-*.log "$OUT"/fuzz-*.log "$OUT"/memcheck.log; do
  echo "== $(basename "$log"): $(grep -E '(passed|failed|error)' "$log" | grep -E ' in [0-9.]+s' | tail -1) $(tail -1 "$log")"
  grep -E '^(FAILED|ERROR)' "$log" | head -8
done
grep -E "ERROR SUMMARY|Invalid" "$OUT/memcheck.log" | head -5
