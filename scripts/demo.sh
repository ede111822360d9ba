#!/usr/bin/env bash
# The main job: a real distributed demo on the embedded tcp:// carrier.
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"
cd "$ROOT"
"$UV" sync --frozen --all-packages --quiet
exec "$UV" run --frozen --no-sync pilot-langgraph demo "$@"
