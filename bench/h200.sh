#!/usr/bin/env bash
# One call on the GPU machine: build, the whole test suite (GPU tests included), the benchmarks.
#   bash bench/h200.sh OUTDIR [pytest args...]   (default: tests, the whole suite)
# Needs .device-site/ (bash ../shared/tools/device-site.sh) for bitsandbytes and .device-wheels/
# (bash bench/device-deps.sh) for transformers, PEFT, hypothesis: carry both. Writes build.log,
# pytest.log, junit.xml, gpu-tests.md and the benchmark JSON under OUTDIR. BENCH="quantize gemm lora e2e"
# picks the benchmarks (BENCH= none; the default leaves out e2e), GEMM_ARGS / LORA_ARGS / E2E_ARGS are
# bench/gemm.py's / lora.py's / e2e.py's arguments (default --sweep / none / none); SKIP_TESTS=1 skips
# the tests; PROFILE=1 adds an ncu profile. TEST_TIMEOUT / TEST_CASE_TIMEOUT / BENCH_TIMEOUT bound the
# suite, one test and one benchmark (s). A call is at most 600 s: tests and `lora e2e` need two calls.
set -uo pipefail
out=${1:?usage: bash bench/h200.sh OUTDIR [pytest args]}
shift
mkdir -p "$out"
# .device-wheels (bash bench/device-deps.sh, carried zipped): transformers, PEFT, accelerate,
# safetensors, hypothesis, which the image lacks; unpacked once into .device-py.
if [ -d .device-wheels ] && [ ! -f .device-py/.stamp ]; then
  rm -rf .device-py
  python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('.device-py') for w in sorted(glob.glob('.device-wheels/*.whl'))]" &&
    touch .device-py/.stamp
fi
[ -d .device-wheels ] || echo "note: no .device-wheels (bash bench/device-deps.sh): tests needing transformers / PEFT / hypothesis skip, e2e fails"
export PYTHONPATH=$PWD/.device-site:$PWD/.device-py${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export PYTHONUNBUFFERED=1
# The image's default compiler (/opt/gcc) links libstdc++ statically into shared objects, and that
# private copy crashes as soon as the extension formats a number (an error message): build with
# the system g++, whose libstdc++ is the process's.
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
  grep -qs "/opt/gcc" build/*/CMakeCache.txt && rm -rf build
fi
t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -v . > "$out/build.log" 2>&1; then
  tail -60 "$out/build.log"; exit 1
fi
grep -m1 "qlora_ext: building" "$out/build.log"
echo "build: $(( $(date +%s) - t0 )) s"
# Up to 4 processes share the GPU; a worker that crashes is reported and replaced, not fatal.
# A device call ends at 600 s: a hung test must not take the whole call and its junit.xml with it.
# TEST_TIMEOUT bounds the suite (SIGINT, so pytest still writes its summary and junit.xml) and,
# where pytest-timeout is installed, TEST_CASE_TIMEOUT each test.
[ $# -gt 0 ] || set -- tests
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "${TEST_CASE_TIMEOUT:-180}" --timeout-method thread)
cmd="python3 -m pytest -q -rfE -n 4 --junitxml=$out/junit.xml $*"
t1=$(date +%s)
rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
timeout -s INT -k 30 "${TEST_TIMEOUT:-420}" python3 -m pytest -q -rfE -n 4 "${per_test[@]}" \
  --junitxml="$out/junit.xml" "$@" > "$out/pytest.log" 2>&1
rc=$?
grep -E "^(FAILED|ERROR)" "$out/pytest.log" | cut -c1-400 | head -40
tail -3 "$out/pytest.log"
echo "tests: $(( $(date +%s) - t1 )) s, exit $rc"
python3 bench/summarize_tests.py "$out/junit.xml" "$cmd" > "$out/gpu-tests.md"
fi
# PROFILE=1: ncu's view of the fused product (ncu-gemm.txt; SourceCounters names the SASS lines
# where warps stall most): PROFILE_SHAPE "N K" (default 28672 8192), PROFILE_M (1), PROFILE_VARIANT
# (0), PROFILE_KERNEL a regex of the kernel's name (gemm_4bit_ws, the default kernel at M = 1).
if [ -n "${PROFILE:-}" ]; then
  timeout 120 /usr/local/cuda/bin/ncu --clock-control none -k regex:${PROFILE_KERNEL:-gemm_4bit_ws} --launch-skip 2 \
    --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section Occupancy --section SchedulerStats --section LaunchStats --section SourceCounters \
    --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio \
    python3 bench/profile_gemm.py ${PROFILE_SHAPE:-28672 8192} ${PROFILE_M:-1} ${PROFILE_VARIANT:-0} > "$out/ncu-gemm.txt" 2>&1
  grep -E "Duration|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|No Eligible|Registers Per|Issued Warp" "$out/ncu-gemm.txt"
fi
# BENCH names the benchmarks to run after the tests (default: all but e2e); BENCH= runs none. Each
# is bounded by BENCH_TIMEOUT seconds (default 300); the scripts rewrite their JSON as rows come, so
# what was measured before a timeout or a crash survives.
bench_run() { timeout -s INT -k 30 "${BENCH_TIMEOUT:-300}" python3 "$@"; }
for b in ${BENCH-quantize gemm lora}; do
  case $b in
    quantize) bench_run bench/quantize.py --out "$out/quantize-h200.json" 2>&1 | tee "$out/bench-quantize.log" | tail -30 ;;
    gemm) bench_run bench/gemm.py ${GEMM_ARGS---sweep} --out "$out/gemm-h200.json" > "$out/bench-gemm.log" 2>&1
          grep -v "^wrote" "$out/bench-gemm.log" | tail -100 ;;
    lora) bench_run bench/lora.py ${LORA_ARGS-} --out "$out/lora-h200.json" > "$out/bench-lora.log" 2>&1
          grep -v "^wrote" "$out/bench-lora.log" | tail -60 ;;
    e2e) bench_run bench/e2e.py ${E2E_ARGS-} --out "$out/e2e-h200.json" > "$out/bench-e2e.log" 2>&1
         grep -v "^wrote" "$out/bench-e2e.log" | tail -30 ;;
  esac
done
exit $rc
