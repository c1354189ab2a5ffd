#!/usr/bin/env bash
# After scripts/device_run.sh on the GPU machine: Nsight Compute sections of the selective scan
# kernels matching a regex (one forward and one backward run at b8 d4096 l4096 n16 bf16), then
# the forward's times at the anchors.md shapes.
#   usage: bash scripts/device_profile_scan.sh [kernel regex, default selective_scan_] [count]
set -uo pipefail
OUT=${OUT:-/tmp/mamba_ext_out}
ncu -k "regex:${1:-selective_scan_}" --section SpeedOfLight --section Occupancy \
  --section WarpStateStats --section SchedulerStats --section LaunchStats \
  --section InstructionStats --section MemoryWorkloadAnalysis --section SourceCounters \
  -c "${2:-2}" python3 benchmarks/profile/profile_selective_scan.py > "$OUT/ncu.txt" 2>&1
grep -E "^  [a-z].*selective_scan_|Duration|Registers Per|Issued Warp|Achieved Active|No Eligible" \
  "$OUT/ncu.txt" | head -20
python3 benchmarks/profile/time_selective_scan_fwd.py | tee -a "$OUT/fwd_times.txt"
