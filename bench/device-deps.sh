#!/usr/bin/env bash
# The Python packages that the GPU machine's image lacks and the tests and benchmarks import:
# transformers, PEFT, accelerate, safetensors (tests/test_model.py, test_cli.py, test_files.py,
# bench/e2e.py), hypothesis (tests/test_properties.py) and pytest-timeout (bench/gpu_suite.sh). Without them those tests skip on the GPU machine
# and bench/e2e.py cannot start; transformers 5 asks for kernels whenever from_pretrained loads. The image has torch 2.11, numpy, packaging and pytest;
# bitsandbytes and torchao come from .device-site/, made outside this repository (../shared/tools/device-site.sh).
#   bash bench/device-deps.sh          (run here, from the project root, with ./dev setup done)
# Downloads CPython 3.12 wheels, at the versions of this machine's .venv (the ones CI tests), into
# .device-wheels/ (git-ignored): carry it. They stay zipped because unpacked they pass the device
# tool's 64 MiB carry limit; bench/gpu_suite.sh unpacks them into .device-py/ there.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${QLORA_VENV:-.venv}/bin/python
# The closure of the imports above, less what the image already has (torch and what it requires,
# numpy, packaging). typing_extensions is included because pydantic needs a newer one than torch.
packages=(transformers tokenizers huggingface_hub hf-xet httpx2 httpcore2 anyio idna truststore h11 click
          typer pydantic pydantic_core annotated-types typing-inspection annotated-doc shellingham rich
          markdown-it-py mdurl pygments regex PyYAML tqdm safetensors peft accelerate psutil hypothesis
          sortedcontainers typing_extensions pytest-timeout kernels tomlkit)
pins=()
for p in "${packages[@]}"; do
  v=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p") ||
    { echo "device-deps: $p is not installed in the venv: run ./dev setup first" >&2; exit 1; }
  pins+=("$p==$v")
done
rm -rf .device-wheels && mkdir .device-wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .device-wheels "${pins[@]}"
du -sh .device-wheels
echo "ready: carry .device-wheels (bench/gpu_suite.sh unpacks it into .device-py and puts that on PYTHONPATH)"
