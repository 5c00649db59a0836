#!/usr/bin/env bash
# On a machine with a CUDA GPU (the project's runs: H100 and H200): build, the whole test suite (GPU
# tests included), the benchmarks, within one device call (600 s): the suite and `lora e2e` do not
# fit one together, so run them in two.
#   bash bench/gpu_suite.sh OUTDIR [pytest args...]   (default: tests, the whole suite)
# Needs .device-site/ for bitsandbytes (made outside this repository, by ../shared/tools/device-site.sh)
# and .device-wheels/ (bash bench/device-deps.sh) for transformers, PEFT, hypothesis: carry both.
# Writes build.log, pytest.log, junit.xml, gpu-tests.md and the benchmark JSON (quantize.json,
# gemm.json, lora.json, e2e.json, e2e-interleaved.json, e2e-dist.json) under OUTDIR; more than 8
# files (what a device call brings back) end up in OUTDIR/results.tar.gz, gpu-tests.md beside it.
# BENCH="quantize gemm lora e2e e2e_interleaved e2e_dist" picks the benchmarks (BENCH= none; the
# default leaves out the whole-model ones: e2e, e2e_interleaved and e2e_dist, which needs 2 GPUs or
# more), GEMM_ARGS / LORA_ARGS / E2E_ARGS / E2E_INTERLEAVED_ARGS / E2E_DIST_ARGS are bench/gemm.py's /
# lora.py's / e2e.py's / e2e_interleaved.py's / e2e_dist.py's arguments (default --sweep / none / none /
# none / none). QUICK=1 runs every benchmark but e2e_dist, e2e and e2e_interleaved too, in its quick
# form (--quick: what a session's first calls run, beside the whole suite). SKIP_TESTS=1 skips the tests; PROFILE=1 adds an ncu profile. TEST_WORKERS: the suite's
# processes (default 8 on a machine of 16 cores or more, else 4), each given an equal share of the
# cores for its CPU threads. TEST_TIMEOUT / TEST_CASE_TIMEOUT / BENCH_TIMEOUT bound the
# suite, one test and one benchmark (s), CALL_BUDGET the whole. The build targets TORCH_CUDA_ARCH_LIST
# where it is set, else the visible GPU (9.0 becomes 9.0a, as CMakeLists.txt does).
# Results are committed renamed under bench/results/ (see bench/results/MANIFEST.md).
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUTDIR [pytest args]}
shift
mkdir -p "$out"
# A device call ends at 600 s, and what it was running is lost with it: each step below gets at most
# what is left before CALL_BUDGET seconds (default 570) from here, and a step left under 30 s is skipped.
deadline=$(( $(date +%s) + ${CALL_BUDGET:-570} ))
left() { echo $(( deadline - $(date +%s) )); }
bounded() {  # bounded LIMIT: the smaller of LIMIT and the time left, less 20 s for the kill grace
  local l=$(( $(left) - 20 ))
  [ "$1" -lt "$l" ] && l=$1
  echo "$l"
}
source "$(dirname "$0")/device_env.sh"  # .device-py, PYTHONPATH, the system g++
t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -v . > "$out/build.log" 2>&1; then
  tail -60 "$out/build.log"; exit 1
fi
grep -m1 "qlora_ext: building" "$out/build.log"
echo "build: $(( $(date +%s) - t0 )) s"
# TEST_WORKERS processes share the GPU; a worker that crashes is reported and replaced, not fatal.
# A device call ends at 600 s: a hung test must not take the whole call and its junit.xml with it.
# TEST_TIMEOUT bounds the suite (SIGINT, so pytest still writes its summary and junit.xml) and,
# where pytest-timeout is installed, TEST_CASE_TIMEOUT each test.
[ $# -gt 0 ] || set -- tests
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "${TEST_CASE_TIMEOUT:-180}" --timeout-method thread)
cores=$(nproc)
workers=${TEST_WORKERS:-$([ "$cores" -ge 16 ] && echo 8 || echo 4)}
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "TEST_WORKERS must be a positive number of processes, got '$workers'"; exit 2; }
# worksteal (pytest-xdist 3.2+): an idle worker takes tests queued behind another's slow one, so that
# a test that hangs leaves only itself unfinished at TEST_TIMEOUT, not the tests queued behind it.
dist=()
python3 -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" 2>/dev/null \
  && dist=(--dist worksteal)
cmd="python3 -m pytest -q -rfE -n $workers ${dist[*]} --junitxml=$out/junit.xml $*"
t1=$(date +%s)
rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
limit=$(bounded "${TEST_TIMEOUT:-420}")
[ $(( $(left) - 20 )) -ge 30 ] || { echo "tests: only $(left) s left of the call after the build; run again (the build is kept)"; exit 1; }
# Each process's torch would start a thread a core: 8 processes on 16 cores would then run 128
# threads that wait on one another.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / workers > 0 ? cores / workers : 1 ))} \
timeout -s INT -k 15 "$limit" python3 -m pytest -q -rfE -n "$workers" "${dist[@]}" "${per_test[@]}" \
  --junitxml="$out/junit.xml" "$@" > "$out/pytest.log" 2>&1
rc=$?
grep -E "^(FAILED|ERROR)" "$out/pytest.log" | cut -c1-400 | head -40
tail -3 "$out/pytest.log"
echo "tests: $(( $(date +%s) - t1 )) s, exit $rc"
python3 bench/summarize_tests.py "$out/junit.xml" "$cmd" > "$out/gpu-tests.md"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  # The junit file then lists only the tests that finished: say so where the counts are read.
  printf '\n**Cut short** after %s s (exit %s): the counts above are of the tests that finished; see pytest.log.\n' \
    "$limit" "$rc" | tee -a "$out/gpu-tests.md"
fi
fi
# PROFILE=1: ncu's view of the fused product (ncu-gemm.txt; SourceCounters names the SASS lines
# where warps stall most): PROFILE_SHAPE "N K" (default 28672 8192), PROFILE_M (1), PROFILE_CONFIG
# (default, a kernel configuration's name, or transposed: the backward product), PROFILE_KERNEL a
# regex of the kernel's name (gemm_4bit_ws, the default kernel at M = 1; gemm_4bit_transposed).
if [ -n "${PROFILE:-}" ]; then
  timeout 120 /usr/local/cuda/bin/ncu --clock-control none -k regex:${PROFILE_KERNEL:-gemm_4bit_ws} --launch-skip 2 \
    --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section Occupancy --section SchedulerStats --section LaunchStats --section SourceCounters \
    --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio \
    python3 bench/profile_gemm.py ${PROFILE_SHAPE:-28672 8192} ${PROFILE_M:-1} ${PROFILE_CONFIG:-default} > "$out/ncu-gemm.txt" 2>&1
  grep -E "Duration|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|No Eligible|Registers Per|Issued Warp" "$out/ncu-gemm.txt"
fi
# BENCH names the benchmarks to run after the tests (default: all but e2e and e2e_dist); BENCH= runs none. Each
# is bounded by BENCH_TIMEOUT seconds (default 300) and by the call's deadline; lora.py and e2e.py
# rewrite their JSON as rows come, so what they measured before a timeout or a crash survives.
bench_run() {
  local limit
  limit=$(bounded "${BENCH_TIMEOUT:-300}")
  if [ $(( $(left) - 20 )) -lt 30 ]; then echo "skipped $1: $(left) s left of the call"; return 0; fi
  timeout -s INT -k 15 "$limit" python3 "$@"
  local rc=$?
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "$1: cut short after $limit s (exit $rc)"
  return $rc
}
quick=()
default_bench="quantize gemm lora"
if [ -n "${QUICK:-}" ]; then  # gemm's quick form replaces the default --sweep; the whole-model ones join
  quick=(--quick) GEMM_ARGS=${GEMM_ARGS-} default_bench="$default_bench e2e_interleaved e2e"  # the shorter first
fi
for b in ${BENCH-$default_bench}; do
  case $b in
    quantize) bench_run bench/quantize.py "${quick[@]}" --out "$out/quantize.json" 2>&1 | tee "$out/bench-quantize.log" | tail -30 ;;
    gemm) bench_run bench/gemm.py "${quick[@]}" ${GEMM_ARGS---sweep} --out "$out/gemm.json" > "$out/bench-gemm.log" 2>&1
          grep -v "^wrote" "$out/bench-gemm.log" | tail -100 ;;
    lora) bench_run bench/lora.py "${quick[@]}" ${LORA_ARGS-} --out "$out/lora.json" > "$out/bench-lora.log" 2>&1
          grep -v "^wrote" "$out/bench-lora.log" | tail -60 ;;
    e2e) bench_run bench/e2e.py "${quick[@]}" ${E2E_ARGS-} --out "$out/e2e.json" > "$out/bench-e2e.log" 2>&1
         grep -v "^wrote" "$out/bench-e2e.log" | tail -30 ;;
    e2e_interleaved) bench_run bench/e2e_interleaved.py "${quick[@]}" ${E2E_INTERLEAVED_ARGS-} \
                       --out "$out/e2e-interleaved.json" > "$out/bench-e2e-interleaved.log" 2>&1
                     grep -v "^wrote" "$out/bench-e2e-interleaved.log" | tail -30 ;;
    # several GPUs (a kind with 2 or more): never in the default list
    e2e_dist) bench_run bench/e2e_dist.py "${quick[@]}" ${E2E_DIST_ARGS-} --out "$out/e2e-dist.json" \
                > "$out/bench-e2e-dist.log" 2>&1
              grep -v "^wrote" "$out/bench-e2e-dist.log" | tail -30 ;;
  esac
done
# A device call brings back at most 8 files from its OUT: past that, everything but gpu-tests.md goes
# into one archive (results.tar.gz), so that no record is left behind for being one file too many.
if [ "$(find "$out" -type f | wc -l)" -gt 8 ]; then
  bundle=$(mktemp -d)/results.tar.gz
  tar -C "$out" -czf "$bundle" --exclude=./gpu-tests.md . && find "$out" -type f ! -name gpu-tests.md -delete \
    && find "$out" -mindepth 1 -type d -empty -delete && mv "$bundle" "$out/" \
    && echo "$out/results.tar.gz: the call's files in one archive (tar -xzf it)"
fi
exit $rc
