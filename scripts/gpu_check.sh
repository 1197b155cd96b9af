#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA GPU (developers' tool; CI has no GPU and never runs this).
# Builds kvtier with CUDA (and GDS where cuFile is found) against the machine's own python3 and
# torch, then runs: the probes and `kvtier info`, the GPU tests (tests/test_cuda.py,
# tests/test_gds.py), bench/bench_gpu.py (kvtier against cudaMemcpy and the staged NVMe path), and
# the whole suite on the GPU machine. Logs and JSON go to $OUT (default ./gpu-out).
#
# Works offline: where liburing/xxhash/pkg-config are missing and a folder .devdeps/ holds their
# Debian packages (apt-get download liburing-dev liburing2 libxxhash-dev pkgconf pkgconf-bin
# libpkgconf3), they are unpacked into /tmp/kvdeps and used from there.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
PY=${PYTHON:-python3}
log() { echo "== $* [$(date +%T)]"; }

if [ -d .devdeps ] && ! pkg-config --exists liburing 2>/dev/null; then
  root=/tmp/kvdeps
  mkdir -p "$root"
  for f in .devdeps/*.deb; do dpkg -x "$f" "$root"; done
  export PATH="$root/usr/bin:$PATH" LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
  export PKG_CONFIG_PATH="$root/usr/lib/x86_64-linux-gnu/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$root"
  export CMAKE_PREFIX_PATH="$root/usr"
fi
# O_DIRECT needs a real file system: keep every temporary file on the repository's disk.
export TMPDIR="$PWD/.gputmp" KVTIER_GDS_TEST_DIR="$PWD/.gputmp"
mkdir -p "$TMPDIR"

log "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv 2>&1 | tee "$out/gpu.txt"
df -hT "$PWD" /tmp 2>&1 | tee -a "$out/gpu.txt"
$PY -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.is_available())" | tee -a "$out/gpu.txt"

log "build"
export KVTIER_CUDA=ON KVTIER_UCX=OFF KVTIER_CUDA_ARCHITECTURES=${KVTIER_CUDA_ARCHITECTURES:-90}
rm -rf /tmp/kvsite
if ! $PY -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check -v \
    --target /tmp/kvsite . >"$out/build.log" 2>&1; then
  tail -60 "$out/build.log"
  exit 1
fi
grep "kvtier:" "$out/build.log" | sed 's/^ *//' | head -8
export PYTHONPATH=/tmp/kvsite

log "probes"
$PY - <<'EOF' 2>&1 | tee "$out/probes.txt"
import json
from kvtier import _core
from kvtier.info import info, render
print(json.dumps({"build": _core.build_info(), "cuda": _core.probe_cuda(), "gds": _core.probe_gds()}, indent=1, default=str))
render(info())
EOF

log "GPU tests"
timeout 240 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_gds.py 2>&1 | tee "$out/test_gpu.log" | tail -25

if [ "${GDS_COMPAT:-1}" = 1 ]; then
log "GDS again, cuFile's POSIX path forced (CUFILE_FORCE_COMPAT_MODE=true)"
grep -n "compat\|posix" /etc/cufile.json 2>/dev/null | head -8
CUFILE_FORCE_COMPAT_MODE=true timeout 120 $PY -m pytest -q -rs -p no:cacheprovider tests/test_gds.py 2>&1 \
  | tee "$out/test_gds_compat.log" | tail -8
CUFILE_FORCE_COMPAT_MODE=true timeout 120 $PY bench/bench_gpu.py --no-copy --json "$out/bench_gds_compat.json" \
  --mib "${BENCH_MIB:-1024}" --reps "${BENCH_REPS:-7}" 2>&1 | tail -5
[ -f cufile.log ] && { echo "cufile.log:"; tail -12 cufile.log; }
fi

log "bench"
timeout 200 $PY bench/bench_gpu.py --json "$out/bench_gpu.json" --mib "${BENCH_MIB:-1024}" --reps "${BENCH_REPS:-7}" \
  --kinds "${BENCH_KINDS:-vllm_flash,kv_first,heads_first,vllm_cpu,layers_first,blocks_first}" \
  2>&1 | tee "$out/bench_gpu.log" | tail -30

if [ "${FULL_SUITE:-1}" = 1 ]; then
  log "whole suite"
  timeout "${SUITE_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider -n 8 tests 2>&1 | tee "$out/test_all.log" | tail -25
fi
log "done"
