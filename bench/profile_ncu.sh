#!/usr/bin/env bash
# ncu's view of one fused-product kernel, with the SASS lines where its warps stall most.
#   bash bench/profile_ncu.sh OUTDIR NAME KERNEL_REGEX N K M CONFIG
# (CONFIG: default, or a kernel configuration's name: bench/profile_gemm.py)
# Writes NAME.txt (the sections) and NAME-sass.csv (the source page) under OUTDIR.
set -uo pipefail
out=$1 name=$2 kernel=$3
shift 3
ncu=/usr/local/cuda/bin/ncu
timeout 150 $ncu --clock-control none -k "regex:$kernel" --launch-skip 2 --launch-count 1 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
  --section SchedulerStats --section LaunchStats --section SourceCounters --section ComputeWorkloadAnalysis \
  --section InstructionStats -o "$out/$name" -f python3 bench/profile_gemm.py "$@" > "$out/$name.log" 2>&1
$ncu -i "$out/$name.ncu-rep" > "$out/$name.txt" 2>&1
$ncu -i "$out/$name.ncu-rep" --page source --csv --print-source sass > "$out/$name-sass.csv" 2>&1
rm -f "$out/$name.ncu-rep" "$out/$name.log"
grep -E "Duration|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\)|Achieved Occupancy|No Eligible|Registers Per|Issued Warp|Executed Ipc A" "$out/$name.txt"
python3 bench/ncu_source.py "$out/$name-sass.csv" 30
