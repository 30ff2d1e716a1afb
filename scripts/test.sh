#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the tests also check llama.cpp's own CLI tools (parity with llama-mtmd-cli, byte-identical quants)
FACTEDGE_TOOLS="${FACTEDGE_TOOLS:-ON}" bash "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest tests "$@"
