#!/usr/bin/env bash
# The main job: set up, show what this build can do, then replay the built-in agent workload on
# the built-in random-weight model under every cache policy (table, replay.json, replay.png), and
# simulate the same policies at fleet scale on a modelled GPU server (simulate.json).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" replay
kvtier info
kvtier replay --policy all --json replay.json --plot replay.png "$@"
kvtier simulate --json simulate.json --plot simulate.png
