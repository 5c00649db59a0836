#!/bin/bash
# A one-off check of the split of the products' kernels (merge 824d5a2): on the GPU machine, build the
# tree before the split (26789df) and this one for sm_90a into build/site-*, then run the default
# gemm_4bit of both over a grid of cases, compared bit for bit and launch for launch. Delete this
# folder once it has passed on a GPU.
#   here:  mkdir -p .verify/orig-src && git archive 26789df | tar -x -C .verify/orig-src
#          (and add /.verify/ to .git/info/exclude); carry .verify
#   there: bash tools/verify_gemm_split/run1.sh
# GEMM_BENCH=1 then times both builds' products (bench/gemm.py --ops gemm, bitsandbytes left out) one
# after the other on the same GPU: gemm-orig.json and gemm-new.json under OUT (the split is to be within
# 3% of the original on every row). KERNEL_TIMES=1 then times each kernel of a few products in both
# builds (torch.profiler): kernel-times.txt under OUT.
set -u
export TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1
[ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch; print(torch.__version__)"
t0=$(date +%s)
root=$PWD
mkdir -p build
( cd .verify/orig-src && python3 -m pip install -q --no-build-isolation --no-deps --target $root/build/site-orig . > $OUT/build-orig.log 2>&1; echo "orig build exit $?" ) &
( python3 -m pip install -v --no-build-isolation --no-deps --target $root/build/site-new . > $OUT/build-new.log 2>&1; echo "new build exit $?" ) &
wait
echo "builds: $(( $(date +%s) - t0 )) s"
grep -i "warning" $OUT/build-new.log | grep -v "avx512\|Remark" | sort | uniq -c | head -20
PYTHONPATH=$root/build/site-orig python3 tools/verify_gemm_split/compare.py dump orig 2>&1 | tail -3
PYTHONPATH=$root/build/site-new python3 tools/verify_gemm_split/compare.py dump new 2>&1 | tail -3
PYTHONPATH=$root/build/site-new python3 tools/verify_gemm_split/compare.py compare 2>&1 | tail -30
if [ -n "${GEMM_BENCH:-}" ]; then
  for tag in orig new; do
    PYTHONPATH=$root/build/site-$tag timeout 150 python3 bench/gemm.py --ops gemm ${GEMM_BENCH_ARGS:-} \
      --out "$OUT/gemm-$tag.json" > "$OUT/bench-gemm-$tag.log" 2>&1; echo "gemm $tag: exit $?"
  done
  python3 - "$OUT/gemm-orig.json" "$OUT/gemm-new.json" <<'PY'
import json, sys
a, b = (json.load(open(p))["rows"] for p in sys.argv[1:3])
key = lambda r: (r.get("op"), r.get("impl"), r.get("n"), r.get("k"), r.get("M"))
old = {key(r): r for r in a if r.get("impl", "").startswith("qlora_ext") and "ms" in r}
worst = []
for r in b:
    if key(r) in old and "ms" in r:
        worst.append((r["ms"] / old[key(r)]["ms"], key(r)))
worst.sort()
print(f"{len(worst)} rows; new / orig time: min {worst[0][0]:.3f}, max {worst[-1][0]:.3f}")
for ratio, k in worst[-5:]:
    print(f"  {ratio:.3f} {k}")
PY
fi
if [ -n "${KERNEL_TIMES:-}" ]; then  # which kernel of a product changed its time
  rm -f /tmp/times_orig.json /tmp/times_new.json  # a warm machine's last run must not stand in for a failed one
  for tag in orig new; do
    PYTHONPATH=$root/build/site-$tag timeout 120 python3 tools/verify_gemm_split/compare.py times $tag 2>&1 | tail -1
  done
  python3 tools/verify_gemm_split/compare.py compare_times | tee "$OUT/kernel-times.txt"
fi
echo "total: $(( $(date +%s) - t0 )) s"
