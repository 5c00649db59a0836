#!/bin/bash
# On the GPU machine (a few seconds): racecheck on the fence-and-atomic reduction of gemm_4bit_ws.cu
# alone, on a barrier control and on an mbarrier alternative (atomic_reduction.cu); initcheck on a cuBLAS product copied to the
# host and on a control (initcheck_cublas.py). Delete this folder once its answers are recorded in
# bench/results/tests/ and acted on.
set -u
cd "$(dirname "$0")"
nvcc -arch=sm_90a -lineinfo -o /tmp/racecheck_probe atomic_reduction.cu || exit 1
for k in barrier atomic mbarrier; do
  /tmp/racecheck_probe "$k"
  compute-sanitizer --tool racecheck --print-limit 5 /tmp/racecheck_probe "$k" 2>&1 | grep -E "Race|hazard|RACECHECK SUMMARY|ERROR SUMMARY|wrong" | head -8
done
for k in elementwise cublas; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck --print-limit 5 python3 initcheck_cublas.py "$k" 2>&1 |
    grep -E "sum|Uninitialized|ERROR SUMMARY" | head -6
done
