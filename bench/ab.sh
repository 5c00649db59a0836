#!/usr/bin/env bash
# One idea against the tree before it, in one device call: both trees' extensions built side by side,
# the same benchmark command run with each in turn on the same GPU, the rows compared.
#   here:  bash bench/ab.sh prepare REV
#            what builds REV's extension (bench, docs, tests and tools left out: ~1 MB) into .ab/base;
#            carry .ab with .device-site and .device-wheels
#   there: bash bench/ab.sh run OUT CMD...
#            e.g. bash bench/ab.sh run $OUT python3 bench/lora.py --modes decode --out {OUT}/lora.json
# CMD runs from this tree both times (the same benchmark script), first with REV's build (PYTHONPATH
# build/ab-base), then with this tree's (build/ab-head); {OUT} in CMD becomes OUT/base, then OUT/head.
# Then, for each JSON file the two runs wrote, bench/ab_compare.py prints head's time over base's, row
# by row; the peers' rows (cuBLAS's, bitsandbytes') show the pair's noise. The builds target what
# CMakeLists.txt picks (TORCH_CUDA_ARCH_LIST, else the visible GPU). Exits 1 if a build or a run
# failed.
set -uo pipefail
usage="usage: bash bench/ab.sh prepare REV | bash bench/ab.sh run OUT CMD..."
what=${1:?$usage}
shift
case "$what" in
  prepare)
    rev=${1:?$usage}
    git rev-parse --verify -q "$rev^{commit}" > /dev/null || { echo "ab.sh: $rev names no commit" >&2; exit 2; }
    rm -rf .ab && mkdir -p .ab/base
    git archive "$rev" | tar -x -C .ab/base --exclude=bench --exclude=docs --exclude=tests --exclude=tools
    git rev-parse --short "$rev" > .ab/base/.ab-rev
    grep -qx "/.ab/" .git/info/exclude 2> /dev/null || echo "/.ab/" >> .git/info/exclude
    echo "ab.sh: .ab/base holds $(cat .ab/base/.ab-rev) ($(du -sh .ab | cut -f1)); carry .ab"
    ;;
  run)
    [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
    mkdir -p "$1" && out=$(cd "$1" && pwd)  # absolute: the base build runs from .ab/base
    shift
    [ -f .ab/base/.ab-rev ] || { echo "ab.sh: no .ab/base: run 'bash bench/ab.sh prepare REV' here and carry .ab" >&2; exit 2; }
    base_rev=$(cat .ab/base/.ab-rev)
    root=$PWD
    source "$(dirname "$0")/device_env.sh"  # .device-py, PYTHONPATH, the system g++
    # Fresh targets: pip install --target keeps a package folder that is already there (a warm
    # machine's last run) and only warns.
    rm -rf build/ab-base build/ab-head
    mkdir -p "$out/base" "$out/head"
    t0=$(date +%s)
    (cd .ab/base && exec python3 -m pip install -q --no-build-isolation --no-deps --target "$root/build/ab-base" .) \
      > "$out/build-base.log" 2>&1 &
    base_pid=$!
    python3 -m pip install -q --no-build-isolation --no-deps --target "$root/build/ab-head" . > "$out/build-head.log" 2>&1 &
    head_pid=$!
    wait $base_pid; base_rc=$?
    wait $head_pid; head_rc=$?
    echo "builds: base ($base_rev) exit $base_rc, head exit $head_rc, $(( $(date +%s) - t0 )) s"
    if [ $base_rc -ne 0 ] || [ $head_rc -ne 0 ]; then
      tail -n 30 "$out/build-base.log" "$out/build-head.log"
      exit 1
    fi
    rc=0
    head_commit=${QLORA_COMMIT:-}
    for side in base head; do
      cmd=("${@//\{OUT\}/"$out/$side"}")
      if [ $side = base ]; then export QLORA_COMMIT=$base_rev; else export QLORA_COMMIT=$head_commit; fi
      [ -n "$QLORA_COMMIT" ] || unset QLORA_COMMIT
      PYTHONPATH=$root/build/ab-$side:$PYTHONPATH "${cmd[@]}" > "$out/$side.log" 2>&1
      side_rc=$?
      echo "$side: exit $side_rc ($(tail -1 "$out/$side.log" | cut -c1-120))"
      [ $side_rc -eq 0 ] || rc=1
    done
    while IFS= read -r -d '' f; do
      rel=${f#"$out/head/"}
      [ -f "$out/base/$rel" ] || continue
      echo "== $rel: head / base"
      python3 bench/ab_compare.py "$out/base/$rel" "$f" || rc=1
    done < <(find "$out/head" -name '*.json' -print0 | sort -z)
    exit $rc
    ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
