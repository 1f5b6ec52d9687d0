#!/usr/bin/env bash
# One device-machine session: install, then the steps named in $STEPS, each time-boxed, logs
# under $OUT (the device tool's folder that comes back). Usage:
#   STEPS="tests sweep bench" bash benchmarks/device_session.sh   # steps: tests sweep inspect compile host model bench
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
for step in ${STEPS:-tests}; do
  start=$(date +%s)
  case $step in
    tests) timeout "${TESTS_TIMEOUT:-330}" python3 -m pytest -q -m gpu tests/ -rfE --tb=short ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
    sweep) (cd benchmarks && timeout "${SWEEP_TIMEOUT:-150}" python3 sweep_configs.py ${SWEEP_ARGS:-}) 2>&1 | tee "$OUT/sweep.log" | grep -v '^{' ;;
    inspect) (cd benchmarks && timeout 120 python3 inspect_template.py ${INSPECT_CASES:-d128}) 2>&1 | tee "$OUT/inspect.log" | grep -v DEBUG | tail -5 ;;
    compile) timeout 120 python3 benchmarks/compile_time.py 2>&1 | tee "$OUT/compile_time.log" | grep -v DEBUG | tail -3 ;;
    host) (cd benchmarks && timeout "${HOST_TIMEOUT:-400}" python3 host_overhead.py ${HOST_CASES:-headline-causal headline}) 2>&1 | tee "$OUT/host.log" | grep -v DEBUG | tail -${HOST_TAIL:-20} ;;
    model) (cd benchmarks && timeout "${MODEL_TIMEOUT:-300}" python3 bench_model.py --out "$OUT" ${MODEL_ARGS:-}) 2>&1 | tee "$OUT/model.log" | grep -v '^{' | grep -v DEBUG | tail -12 ;;
    bench) (cd benchmarks && timeout "${BENCH_TIMEOUT:-240}" python3 bench.py --out "$OUT" ${BENCH_ARGS:-}) 2>&1 | tee "$OUT/bench.log" | grep -v '^{' ;;
  esac
  echo "## step $step took $(( $(date +%s) - start ))s"
done
