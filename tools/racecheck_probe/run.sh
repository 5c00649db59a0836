#!/bin/bash
# On the GPU machine: builds the probe and runs racecheck on both kernels (a few seconds). Delete this
# folder once its answer is recorded in bench/results/tests/ and acted on.
set -u
cd "$(dirname "$0")"
nvcc -arch=sm_90a -lineinfo -o /tmp/racecheck_probe atomic_reduction.cu || exit 1
for k in barrier atomic; do
  /tmp/racecheck_probe "$k"
  compute-sanitizer --tool racecheck --print-limit 5 /tmp/racecheck_probe "$k" 2>&1 | grep -E "Race|hazard|RACECHECK SUMMARY|ERROR SUMMARY|wrong" | head -8
done
