#!/usr/bin/env bash
# One call on a GPU machine: install the package (and FlashAttention 4 when its wheels came along),
# then run the steps named in $STEPS one after another, each time-boxed, logs and result files
# under $OUT. Run from the repository root:
#   STEPS="tests run" bash benchmarks/gpu_steps.sh
# Steps (each step's *_ARGS are passed to its command; see benchmarks/README.md):
#   tests fuzz memcheck fa4tests multigpu   the GPU test suites (tests: -v, so that a time-boxed log names every test
#                                           that finished; TESTS_FILES, TESTS_WORKERS/FA4_WORKERS: pytest-xdist
#                                           workers from .whl/; time-boxed with SIGINT so pytest still
#                                           prints its summary and --durations=$TESTS_DURATIONS)
#   run choice features model ab sweep profile   python -m benchmarks <step> $<STEP>_ARGS
#   ncu                                     Nsight Compute of the forward kernels (NCU_IMPLS x NCU_CASES)
#   context-parallel                        torchrun on 2 GPUs, one run per $CP_SHAPES (docs x doc length)
#   context-parallel-fake                   one GPU as rank 0 of W over the fake process group, per world
#                                           size:shape of $CP_FAKE_RUNS ("4:4x131072") and exchange of $CP_EXCHANGES
#   examples                                examples/quickstart.py and examples/export_aoti.py
#   fsdp                                    examples/train_fsdp.py per GPUs:tokens of $FSDP_RUNS (tokens/s)
# Another torch (benchmarks/torch_in_parts.sh): TORCH_PARTS=<a parts folder> collects its parts in
# /tmp/torch_parts, one call per folder; the call with the last folder unpacks them to
# /tmp/torch_site, and every call after puts it first on PYTHONPATH (IMAGE_TORCH=1: the machine's
# torch, with only the FlashAttention 4 packed beside it).
# Wheels in .whl/ (e.g. expecttest, pytest-xdist) are installed first. FlashAttention 4 is installed
# from its wheels when they are in the tree: the wheels in .fa4b/, the large one split into
# .fa4a/part.aa (copied to /tmp/fa4 by a first call) and .fa4b/part.ab.
set -uo pipefail
export PYTHONUNBUFFERED=1
# NVLink multicast stays off in every process (the 2-GPU machine requires it; harmless elsewhere).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -n "${TORCH_PARTS:-}" ]; then
  mkdir -p /tmp/torch_parts && cp "$TORCH_PARTS"/* /tmp/torch_parts/
  if [ ! -f /tmp/torch_parts/SHA256SUMS ]; then echo "collected $(ls /tmp/torch_parts/part.* | wc -l) parts"; exit 0; fi
  if [ ! -d /tmp/torch_site/torch ]; then
    (cd /tmp/torch_parts && sha256sum -c --quiet SHA256SUMS) || { echo "a part is missing: carry every folder again, back to back"; exit 3; }
    mkdir -p /tmp/torch_site && cat $(ls /tmp/torch_parts/part.* | sort) | xz -d -T0 | tar -x -C /tmp/torch_site
  fi
fi
if [ -d /tmp/torch_site/torch ]; then
  fa4_site=/tmp/torch_site/fa4:/tmp/torch_site/fa4/nvidia_cutlass_dsl/dsl_packages
  # NVIDIA libraries packed beside that torch (newer than the machine's) are found before the machine's.
  if [ -z "${IMAGE_TORCH:-}" ] && compgen -G "/tmp/torch_site/nvidia/*/lib" >/dev/null; then
    for lib in /tmp/torch_site/nvidia/*/lib; do export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; done
  fi
  if [ -n "${IMAGE_TORCH:-}" ]; then export PYTHONPATH=$fa4_site${PYTHONPATH:+:$PYTHONPATH}
  else export PYTHONPATH=/tmp/torch_site:$fa4_site${PYTHONPATH:+:$PYTHONPATH}; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >"$OUT/wheels.log" 2>&1 || { tail -20 "$OUT/wheels.log"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .fa4b ] && compgen -G "/tmp/fa4/part.*" >/dev/null; then
  cat /tmp/fa4/part.* .fa4b/part.* > /tmp/fa4/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/fa4/*.whl .fa4b/*.whl >"$OUT/fa4.log" 2>&1 \
    || { tail -20 "$OUT/fa4.log"; exit 1; }
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import flash_attn.cute.interface as i; from importlib.metadata import version; print('flash-attn-4', version('flash-attn-4'))"
elif [ -d .fa4b ]; then
  echo "FA4 wheels: /tmp/fa4 is empty (the machine was restarted between the two calls): redo both calls"; exit 3
elif [ -d /tmp/site/flash_attn ]; then  # installed by an earlier call on this (still warm) machine
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
for step in ${STEPS:-tests}; do
  start=$(date +%s)
  case $step in
    tests) timeout -s INT "${TESTS_TIMEOUT:-400}" python3 -m pytest -v -m "gpu and not fuzz and not fa4" ${TESTS_FILES:-tests/} -rfEs --tb=short \
        --durations=${TESTS_DURATIONS:-0} ${TESTS_WORKERS:+-n "$TESTS_WORKERS"} ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -${TESTS_TAIL:-40} ;;
    fuzz) timeout "${FUZZ_TIMEOUT:-420}" python3 -m pytest -q -m fuzz tests/ -rfE --tb=line ${FUZZ_PART:+--fuzz-part "$FUZZ_PART"} \
        ${FUZZ_K:+-k "$FUZZ_K"} --durations=12 2>&1 | tee "$OUT/fuzz.log" | grep -v "DEBUG\|torch.__trace" | tail -25 ;;
    memcheck) PYTORCH_NO_CUDA_MEMORY_CACHING=1 TORCHINDUCTOR_COMPILE_THREADS=1 timeout "${MEMCHECK_TIMEOUT:-300}" \
        compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 ${MEMCHECK_FLAGS:-} python3 -m pytest -q -m gpu \
        ${MEMCHECK_TESTS:-tests/test_numerics_gpu.py tests/test_compile_gpu.py} -k "${MEMCHECK_K:-not training and not autotune and not cuda_graphs and not 100_batches}" \
        -rfE --tb=short 2>&1 | tee "$OUT/memcheck.log" | tail -15; echo "memcheck exit ${PIPESTATUS[0]}" ;;
    run|choice|features|model|ab|sweep|profile)  # result files go to $OUT (the commands' default --out)
        args="${step^^}_ARGS"; default=""
        [ "$step" = ab ] && default=softcap
        [ "$step" = profile ] && default="host headline-causal headline"
        # shellcheck disable=SC2086
        timeout "${STEP_TIMEOUT:-400}" python3 -m benchmarks "$step" ${!args:-$default} 2>&1 | tee "$OUT/$step.log" \
          | grep -v '^{' | grep -v DEBUG | tail -"${STEP_TAIL:-30}" ;;
    ncu) for impl in ${NCU_IMPLS:-ours fa4}; do for case in ${NCU_CASES:-d128}; do
          timeout "${NCU_TIMEOUT:-150}" ncu -k regex:"varlen_fwd|flash_fwd" --launch-skip 3 --launch-count 1 --section SpeedOfLight \
            --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
            python3 -m benchmarks profile ncu "$case" --impl "$impl" > "$OUT/ncu_${case}_${impl}.txt" 2>&1
          grep -E "^  [a-z]|Duration|Throughput|Pipe|Issue|Warp Cycles|Registers|Theoretical Occ|Achieved Occ|Shared Memory Config" \
            "$OUT/ncu_${case}_${impl}.txt" | grep -v "^    ---" | head -"${NCU_TAIL:-45}"; done; done ;;
    fa4tests) timeout "${FA4_TIMEOUT:-400}" python3 -m pytest -q tests/test_choice_gpu.py -rfEs --tb=short ${PYTEST_K:+-k "$PYTEST_K"} \
        ${FA4_WORKERS:+-n "$FA4_WORKERS"} 2>&1 \
        | tee "$OUT/fa4_tests.log" | tail -"${TESTS_TAIL:-40}" ;;
    multigpu) timeout -s INT "${MULTIGPU_TIMEOUT:-500}" python3 -m pytest -q -m multigpu tests/test_distributed.py -rfEs --tb=short \
        --durations=5 2>&1 | tee "$OUT/multigpu_tests.log" | tail -"${TESTS_TAIL:-40}" ;;
    context-parallel) for shape in ${CP_SHAPES:-2x65536 2x131072 32x4096}; do
          timeout "${CP_TIMEOUT:-240}" torchrun --nproc-per-node 2 -m benchmarks context-parallel --docs "${shape%x*}" \
            --doc-len "${shape#*x}" --out "$OUT/context_parallel.jsonl" >> "$OUT/context_parallel.log" 2>&1
          grep -E "^\||tokens, " "$OUT/context_parallel.log" | tail -4 | grep -v "^|---"; done ;;
    context-parallel-fake) for run in ${CP_FAKE_RUNS:-2:2x65536 2:2x131072}; do  # world size:docs x doc length
          shape=${run#*:}; for exchange in ${CP_EXCHANGES:-all_gather}; do
          timeout "${CP_TIMEOUT:-240}" python3 -m benchmarks context-parallel --fake-world-size "${run%%:*}" --docs "${shape%x*}" \
            --doc-len "${shape#*x}" --exchange "$exchange" ${CP_ARGS:-} --out "$OUT/context_parallel_fake.jsonl" \
            >> "$OUT/context_parallel_fake.log" 2>&1
          grep -E "^\||tokens, " "$OUT/context_parallel_fake.log" | tail -4 | grep -v "^|---"; done; done ;;
    examples) for example in quickstart export_aoti; do
          timeout "${EXAMPLES_TIMEOUT:-240}" python3 "examples/$example.py" > "$OUT/example_$example.log" 2>&1
          echo "examples/$example.py exit $?: $(tail -3 "$OUT/example_$example.log" | tr '\n' ' ')"; done ;;
    fsdp) for run in ${FSDP_RUNS:-1:65536 2:65536 2:131072}; do  # GPUs:tokens per global batch
          timeout "${FSDP_TIMEOUT:-240}" torchrun --nproc-per-node "${run%:*}" examples/train_fsdp.py --tokens "${run#*:}" \
            --out "$OUT/fsdp_${run%:*}gpu_${run#*:}.json" ${FSDP_ARGS:-} > "$OUT/fsdp_${run%:*}gpu_${run#*:}.log" 2>&1
          echo "FSDP, ${run%:*} GPU(s), ${run#*:} tokens per step: $(grep "^step" "$OUT/fsdp_${run%:*}gpu_${run#*:}.log" | tail -1)"; done ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "## step $step took $(( $(date +%s) - start ))s"
done
