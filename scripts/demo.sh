#!/usr/bin/env bash
# The main job: set up, then show what this build can do and how fast it copies KV blocks.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
kvtier info
kvtier bench copy --json bench-copy.json "$@"
