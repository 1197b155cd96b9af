#!/usr/bin/env bash
# Rebuild the native core with AddressSanitizer + UndefinedBehaviorSanitizer and rerun the tests
# that exercise it (pools, transfers, bad input, NVMe crash/corruption, cache, UCX peers). Uses .venv from
# setup.sh; the sanitized module is loaded from build/asan-pkg ahead of the installed one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
pip install --disable-pip-version-check -q nanobind cmake ninja
cmake -S . -B build/asan -G Ninja -DKVTIER_SANITIZE=ON -DKVTIER_CUDA=OFF -DKVTIER_GDS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build build/asan -j"$(nproc)" >/dev/null
rm -rf build/asan-pkg && mkdir -p build/asan-pkg
cp -r python/kvtier build/asan-pkg/
cp build/asan/_core*.so build/asan-pkg/kvtier/
export PYTHONPATH="$PWD/build/asan-pkg"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
echo "kvtier: rerunning the native-heavy tests under ASan/UBSan"
python -c "import kvtier, sys; assert 'asan-pkg' in kvtier.__file__, kvtier.__file__"
python -m pytest -q -p no:cacheprovider tests/test_pool.py tests/test_transfer.py tests/test_bad_input.py \
  tests/test_nvme.py tests/test_cache.py tests/test_keys.py tests/test_trace.py tests/test_ucx_peer.py
