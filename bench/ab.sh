#!/usr/bin/env bash
# One idea against the tree before it, in one device call: the trees' extensions built side by side,
# the same benchmark command run with each in turn on the same GPU, the rows compared.
#   here:  bash bench/ab.sh prepare REV [REV2 ...]
#            what builds each REV's extension (bench, docs, tests and tools left out: ~1 MB) into
#            .ab/base (REV), .ab/base2 (REV2), ...; carry .ab with .device-site and .device-wheels
#   there: bash bench/ab.sh run OUT CMD...
#            e.g. bash bench/ab.sh run $OUT python3 bench/lora.py --modes decode --out {OUT}/lora.json
# CMD runs from this tree each time (the same benchmark script): with REV's build (PYTHONPATH
# build/ab-base), REV2's (build/ab-base2), ..., then this tree's (build/ab-head); {OUT} in CMD becomes
# OUT/base, OUT/base2, ..., OUT/head. Then, for each JSON file two neighbours in that order wrote,
# bench/ab_compare.py prints the later one's time over the earlier one's, row by row: a chain of ideas
# (REV = main, REV2 = main + one idea, this tree = REV2 + the next) is measured one idea at a time in
# one call. The peers' rows (cuBLAS's, bitsandbytes') show each pair's noise. The builds target what
# CMakeLists.txt picks (TORCH_CUDA_ARCH_LIST, else the visible GPU); build/ab-head serves tests too
# (PYTHONPATH=$PWD/build/ab-head python3 -m pytest ...). Exits 1 if a build or a run failed.
set -uo pipefail
usage="usage: bash bench/ab.sh prepare REV [REV2 ...] | bash bench/ab.sh run OUT CMD..."
what=${1:?$usage}
shift
case "$what" in
  prepare)
    [ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
    for rev in "$@"; do
      git rev-parse --verify -q "$rev^{commit}" > /dev/null || { echo "ab.sh: $rev names no commit" >&2; exit 2; }
    done
    rm -rf .ab
    i=1
    for rev in "$@"; do
      side=base$([ $i -gt 1 ] && echo $i)
      mkdir -p ".ab/$side"
      git archive "$rev" | tar -x -C ".ab/$side" --exclude=bench --exclude=docs --exclude=tests --exclude=tools
      git rev-parse --short "$rev" > ".ab/$side/.ab-rev"
      echo "ab.sh: .ab/$side holds $(cat ".ab/$side/.ab-rev")"
      i=$((i + 1))
    done
    grep -qx "/.ab/" .git/info/exclude 2> /dev/null || echo "/.ab/" >> .git/info/exclude
    echo "ab.sh: $(du -sh .ab | cut -f1) in .ab; carry it"
    ;;
  run)
    [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
    mkdir -p "$1" && out=$(cd "$1" && pwd)  # absolute: the bases' builds run from .ab/base*
    shift
    [ -f .ab/base/.ab-rev ] || { echo "ab.sh: no .ab/base: run 'bash bench/ab.sh prepare REV' here and carry .ab" >&2; exit 2; }
    sides=(base)  # in the order prepare was given them, then this tree
    for ((i = 2; i < 100; i++)); do
      [ -f ".ab/base$i/.ab-rev" ] || break
      sides+=("base$i")
    done
    sides+=(head)
    root=$PWD
    source "$(dirname "$0")/device_env.sh"  # .device-py, PYTHONPATH, the system g++
    # Fresh targets: pip install --target keeps a package folder that is already there (a warm
    # machine's last run) and only warns.
    rm -rf build/ab-*
    declare -A rev pid
    # The builds share the cores (each would otherwise run a compiler a core, several at once).
    export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(( ($(nproc) + ${#sides[@]} - 1) / ${#sides[@]} ))}
    t0=$(date +%s)
    for side in "${sides[@]}"; do
      mkdir -p "$out/$side"
      src=$root
      if [ "$side" = head ]; then rev[$side]=${QLORA_COMMIT:-}; else src=$root/.ab/$side rev[$side]=$(cat ".ab/$side/.ab-rev"); fi
      (cd "$src" && exec python3 -m pip install -q --no-build-isolation --no-deps --target "$root/build/ab-$side" .) \
        > "$out/build-$side.log" 2>&1 &
      pid[$side]=$!
    done
    rc=0
    for side in "${sides[@]}"; do
      wait "${pid[$side]}"
      build_rc=$?
      echo "build $side (${rev[$side]:-this tree}): exit $build_rc, $(( $(date +%s) - t0 )) s"
      [ $build_rc -eq 0 ] || { tail -n 30 "$out/build-$side.log"; rc=1; }
    done
    [ $rc -eq 0 ] || exit 1
    for side in "${sides[@]}"; do
      cmd=("${@//\{OUT\}/"$out/$side"}")
      export QLORA_COMMIT=${rev[$side]}
      [ -n "$QLORA_COMMIT" ] || unset QLORA_COMMIT
      PYTHONPATH=$root/build/ab-$side:$PYTHONPATH "${cmd[@]}" > "$out/$side.log" 2>&1
      side_rc=$?
      echo "$side: exit $side_rc ($(tail -1 "$out/$side.log" | cut -c1-120))"
      [ $side_rc -eq 0 ] || rc=1
    done
    for ((i = 1; i < ${#sides[@]}; i++)); do
      before=${sides[i - 1]} after=${sides[i]}
      while IFS= read -r -d '' f; do
        rel=${f#"$out/$after/"}
        [ -f "$out/$before/$rel" ] || continue
        echo "== $rel: $after / $before"
        python3 bench/ab_compare.py "$out/$before/$rel" "$f" || rc=1
      done < <(find "$out/$after" -name '*.json' -print0 | sort -z)
    done
    exit $rc
    ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
