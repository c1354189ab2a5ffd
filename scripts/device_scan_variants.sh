#!/usr/bin/env bash
# After scripts/device_run.sh on the GPU machine: Nsight Compute sections of one selective scan
# forward and backward, then forward times of kernel variants built with other nvcc flags
# (-D... of experiment macros a kernel reads, when it has some).
#   usage: bash scripts/device_scan_variants.sh ["FLAGS A" "FLAGS B" ...]
set -uo pipefail
OUT=${OUT:-/tmp/mamba_ext_out}
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAMBA_EXT_CUDA=1
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
ncu -k regex:selective_scan_ --section SpeedOfLight --section Occupancy --section WarpStateStats \
  --section SchedulerStats --section LaunchStats --section InstructionStats -c 2 \
  python3 benchmarks/profile/profile_selective_scan.py > "$OUT/ncu.txt" 2>&1
grep -E "^  [a-z].*selective_scan_|Duration|Registers Per|Issued Warp|Achieved Active|No Eligible" \
  "$OUT/ncu.txt" | head -20
python3 benchmarks/profile/time_selective_scan_fwd.py base | tee -a "$OUT/variants.txt"
for flags in "$@"; do
  NVCC_APPEND_FLAGS="$flags" python3 setup.py build_ext --inplace --force > "$OUT/build_variant.log" 2>&1 \
    || { tail -20 "$OUT/build_variant.log"; continue; }
  python3 benchmarks/profile/time_selective_scan_fwd.py "$flags" | tee -a "$OUT/variants.txt"
done
