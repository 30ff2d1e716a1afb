#!/usr/bin/env bash
# Set up (idempotent) and run the demo. Extra arguments go to `factedge demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/factedge" demo "$@"
