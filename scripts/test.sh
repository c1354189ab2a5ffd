#!/usr/bin/env bash
# README's test command: installs what the tests need (torch from the wheel on disk), builds the
# extension in place, then runs every check that needs no GPU: pytest, the C++ tests through the
# dispatcher (CMake + ctest), and a compile of every .cu file for sm_90a.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /usr/lib/ccache ] && export PATH="/usr/lib/ccache:$PATH"

python3 -m pip install -q -r requirements/test.txt
python3 -m pip install -q --no-build-isolation -e .

python3 -m pytest -q

mkdir -p build
torch_prefix=$(python3 -c "import torch; print(torch.utils.cmake_prefix_path)")
cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" > build/cmake-configure.log 2>&1
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure

bash scripts/check_cuda_compile.sh
