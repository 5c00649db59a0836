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
# by row. The builds target TORCH_CUDA_ARCH_LIST where it is set, else the visible GPU (9.0 -> 9.0a).
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
    out=${1:?$usage}
    shift
    [ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
    [ -f .ab/base/.ab-rev ] || { echo "ab.sh: no .ab/base: run 'bash bench/ab.sh prepare REV' here and carry .ab" >&2; exit 2; }
    mkdir -p "$out/base" "$out/head"
    root=$PWD
    if [ -d .device-wheels ] && [ ! -f .device-py/.stamp ]; then  # as bench/gpu_suite.sh unpacks them
      mkdir -p .device-py
      python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('.device-py') for w in sorted(glob.glob('.device-wheels/*.whl'))]" &&
        ls .device-wheels | sha256sum | cut -c1-16 > .device-py/.stamp
    fi
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
      TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
      [ "$TORCH_CUDA_ARCH_LIST" = "9.0" ] && TORCH_CUDA_ARCH_LIST=9.0a
      export TORCH_CUDA_ARCH_LIST
    fi
    # The system g++ (see bench/gpu_suite.sh: the image's /opt/gcc links a private libstdc++).
    [ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
    t0=$(date +%s)
    (cd .ab/base && python3 -m pip install -q --no-build-isolation --no-deps --target "$root/build/ab-base" . \
      > "$out/build-base.log" 2>&1; echo "base ($(cat .ab-rev)) build: exit $?") &
    (python3 -m pip install -q --no-build-isolation --no-deps --target "$root/build/ab-head" . \
      > "$out/build-head.log" 2>&1; echo "head build: exit $?") &
    wait
    echo "builds: $(( $(date +%s) - t0 )) s"
    for side in base head; do
      cmd=("${@//\{OUT\}/$out/$side}")
      PYTHONPATH=$root/build/ab-$side:$root/.device-site:$root/.device-py${PYTHONPATH:+:$PYTHONPATH} "${cmd[@]}" \
        > "$out/$side.log" 2>&1
      echo "$side: exit $? ($(tail -1 "$out/$side.log" | cut -c1-120))"
    done
    for f in "$out"/head/*.json; do
      [ -f "$f" ] && [ -f "$out/base/$(basename "$f")" ] || continue
      echo "== $(basename "$f"): head / base"
      python3 bench/ab_compare.py "$out/base/$(basename "$f")" "$f"
    done
    ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
