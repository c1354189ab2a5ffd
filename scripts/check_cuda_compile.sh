#!/usr/bin/env bash
# Compiles every .cu file under csrc/ for sm_90a (and sm_80, which the build must also support),
# without torch: the kernels see only params headers and plain C++, so a CUDA compile error is
# caught on a machine with nvcc but no GPU and no CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(find csrc -name '*.cu' | sort)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_cuda_compile: no .cu files"
  exit 0
fi
if ! command -v nvcc > /dev/null; then
  if [ "${CI:-}" = "true" ]; then echo "check_cuda_compile: nvcc not found" >&2; exit 1; fi
  echo "check_cuda_compile: nvcc not found, skipped"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
jobs=$(nproc)
printf '%s\n' "${files[@]}" | xargs -P "$jobs" -I{} sh -c '
  nvcc -std=c++17 -O3 --expt-relaxed-constexpr -DMAMBA_EXT_WITH_CUDA -Icsrc \
    -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80 \
    -c "$1" -o "$2/$(echo "$1" | tr / _).o" && echo "compiled $1"' _ {} "$out"
echo "check_cuda_compile: ${#files[@]} files compiled for sm_90a and sm_80"
