#!/usr/bin/env bash
# Another torch (and Triton, FlashAttention 4) for a GPU machine that cannot download, in as few
# transfers as possible: the wheels unpacked into one site folder, the files no GPU run of this
# package loads left out, xz-compressed, split into parts of at most 60 MiB.
#
#   bash benchmarks/torch_in_parts.sh torch==2.15.0 triton==3.9.0        # here, in the repo root
#
# Extra wheel files (e.g. FlashAttention 4's, already downloaded) can follow as paths ending in
# .whl; they go to the site folder's fa4/ subfolder (put it on PYTHONPATH for either torch).
# NVIDIA libraries newer than the machine's can follow as specs (nvidia-nvshmem-cu13==3.7.2): only
# their shared libraries are kept, in nvidia/<name>/lib beside torch, where it loads them from.
# Writes .torch_parts/NN/part.* (git-ignored) and prints how many folders there are. On the GPU
# machine, one call per folder, back to back (its /tmp must survive between them):
#   TORCH_PARTS=.torch_parts/NN bash benchmarks/gpu_steps.sh   (STEPS unset: only collects)
# and with the last folder the steps to run on that torch:
#   TORCH_PARTS=.torch_parts/NN STEPS="tests memcheck run" bash benchmarks/gpu_steps.sh
# which joins the parts (checksums), unpacks them to /tmp/torch_site and puts it first on
# PYTHONPATH. torch's own CUDA libraries (nvidia-* wheels) are not included unless named: it loads
# the machine's. torch 2.15.0 cannot load with the H200 image's NVSHMEM 3.4.5 (it needs 3.7.2:
# "libtorch_nvshmem.so: undefined symbol: nvshmem_selected_device_transport", seen there
# 2026-12-01), and its libtorch_cuda.so needs 11 NCCL functions that the image's NCCL 2.28.9 does
# not export (ncclCommGrow, ncclCommSuspend, ncclPutSignal, ...; read with nm here): name
# nvidia-nvshmem-cu13==3.7.2 nvidia-nccl-cu13==2.30.7 (their pins; 49 + 241 MiB of libraries). Measured
# 2026-12-01: torch 2.15.0 + triton 3.9.0 (786 MiB of wheels) and FA4's wheels (100 MiB) made 10
# parts (xz -6 of the unpacked trees, 582 MiB) instead of 16; with NVSHMEM and NCCL, 14 (9 minutes
# here).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
specs=() extra=()
for arg in "$@"; do
  case $arg in
    *.whl) extra+=("$(realpath "$arg")") ;;
    *) specs+=("$arg") ;;
  esac
done
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_18_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# shellcheck disable=SC2086
PIP_CONSTRAINT=/dev/null python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp $PLATFORMS -d "$work/wheels" "${specs[@]}"
mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do unzip -q -o "$wheel" -d "$work/site"; done
if [ ${#extra[@]} -gt 0 ]; then
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
    $PLATFORMS --target "$work/site/fa4" "${extra[@]}"
fi
# Not loaded by a CUDA run of this package: Triton's AMD backend, the pre-sm90 ptxas (Triton 3.9
# compiles sm_90 with ptxas-blackwell), static profiling libraries, protoc.
# NVIDIA library wheels: their shared libraries only (headers, bitcode and static archives stay).
find "$work/site/nvidia" -type f ! -name "*.so*" -delete 2>/dev/null || true
rm -rf "$work/site/triton/backends/amd" "$work/site/triton/backends/nvidia/bin/ptxas" \
  "$work/site/triton/backends/nvidia/lib/cupti-blackwell" "$work/site/torch/bin/protoc"*
find "$work/site/triton/backends/nvidia/lib" -name "*.a" -delete 2>/dev/null || true
rm -rf .torch_parts && mkdir -p .torch_parts
tar -C "$work/site" -cf - . | xz -T0 -6 | split -b 60m -d -a 2 - "$work/part."
(cd "$work" && sha256sum part.* > SHA256SUMS)
count=0
for part in "$work"/part.*; do
  count=$((count + 1)); folder=$(printf ".torch_parts/%02d" "$count"); mkdir -p "$folder"; mv "$part" "$folder/"
done
cp "$work/SHA256SUMS" "$folder/"
echo "$count folders: .torch_parts/01 .. $folder (carry one per call; SHA256SUMS is in the last)"
