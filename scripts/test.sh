#!/usr/bin/env bash
# Set up with the test extras (and torch 2.13.0 CPU), then run the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" test
python -c "import kvtier._core as c; b = c.build_info(); print('kvtier build: cuda=%s io_uring=%s ucx=%s' % (b['cuda'], b['io_uring'], b['ucx']))"
python -m pytest -q "$@"
