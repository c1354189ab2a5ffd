#!/usr/bin/env bash
# One round trip on the GPU machine (the device tool runs this from the repository root):
# builds for sm_90a with 16 jobs, runs the CUDA tests and the benchmarks, and leaves logs and
# results under $OUT (at most 8 files come back, so the results travel as one tarball).
#   usage: bash scripts/device_run.sh [pytest selection, default: -m cuda] [bench_*.py names...]
set -uo pipefail
OUT=${OUT:-/tmp/mamba_ext_out}
mkdir -p "$OUT"
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} PYTHONUNBUFFERED=1 MAMBA_EXT_CUDA=1
# The image's CC/CXX (/opt/gcc) link libstdc++ into the library statically: the first C++
# exception it throws (any failed TORCH_CHECK) then segfaults the process (seen on an H100
# machine, 2026-11-23). The system compiler links it dynamically, as torch does.
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
pytest_args=${1:--m cuda}
shift || true
benches=("$@")

{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1
status=$?
echo "build: exit $status in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
[ $status -eq 0 ] || { tail -50 "$OUT/build.log"; exit $status; }

# shellcheck disable=SC2086
python3 -m pytest -q --maxfail=25 $pytest_args 2>&1 | tee "$OUT/tests.log" | tail -30
echo "tests: exit ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"

for bench in "${benches[@]}"; do
  python3 "benchmarks/$bench" 2>&1 | tee -a "$OUT/bench.log" | tail -25
done
tar -czf "$OUT/results.tar.gz" benchmarks/results
cat "$OUT/summary.txt"
