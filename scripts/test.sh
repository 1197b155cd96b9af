#!/usr/bin/env bash
# Set up with the test extras (and torch 2.13.0 CPU), run the whole test suite, then rerun the
# native-heavy tests on an ASan/UBSan build of the core.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" test
python -c "import kvtier._core as c; b = c.build_info(); print('kvtier build: cuda=%s io_uring=%s ucx=%s gds=%s' % (b['cuda'], b['io_uring'], b['ucx'], b.get('gds')))"
python -m pytest -q "$@"
if [ "$#" -eq 0 ]; then
  bash "$(dirname "${BASH_SOURCE[0]}")/sanitize.sh"
fi
