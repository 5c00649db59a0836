# The device machine's environment for a build and its runs, sourced by bench/gpu_suite.sh and
# bench/ab.sh from the repository's root.
# .device-wheels (bash bench/device-deps.sh, carried zipped): transformers, PEFT, accelerate,
# safetensors, hypothesis, which the image lacks; unpacked once into .device-py.
if [ -d .device-wheels ]; then
  wheels=$(ls .device-wheels | sha256sum | cut -c1-16)
  if [ "$(cat .device-py/.stamp 2>/dev/null)" != "$wheels" ]; then
    rm -rf .device-py && mkdir -p .device-py
    python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('.device-py') for w in sorted(glob.glob('.device-wheels/*.whl'))]" &&
      echo "$wheels" > .device-py/.stamp
  fi
fi
[ -d .device-wheels ] || echo "note: no .device-wheels (bash bench/device-deps.sh): tests needing transformers / PEFT / hypothesis skip, e2e fails"
export PYTHONPATH=$PWD/.device-site:$PWD/.device-py${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# The image's default compiler (/opt/gcc) links libstdc++ statically into shared objects, and that
# private copy crashes as soon as the extension formats a number (an error message): build with
# the system g++, whose libstdc++ is the process's (a build folder configured with the other is
# removed: CMake keeps the compiler of its first configure).
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
  grep -qs "/opt/gcc" build/*/CMakeCache.txt && rm -rf build
fi
# The GPU machine's git can hold an older HEAD than the tree that travelled (the session's first
# checkout): a QLORA_COMMIT read from it there (`$(git rev-parse --short HEAD)` in the command) names
# that older commit. Where the name is that HEAD's and the tracked files differ from it, the records
# say so (+dirty) rather than name a commit whose code did not run; pass the hash from here instead.
if [ -n "${QLORA_COMMIT:-}" ] && [ "$(git rev-parse --short HEAD 2>/dev/null)" = "$QLORA_COMMIT" ] &&
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "note: QLORA_COMMIT=$QLORA_COMMIT is this machine's git HEAD, and the tree differs from it: recorded as $QLORA_COMMIT+dirty (pass the hash as a literal)"
  export QLORA_COMMIT=$QLORA_COMMIT+dirty
fi
