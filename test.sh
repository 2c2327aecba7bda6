#!/usr/bin/env bash
# The test suite (unit, protocol, and real multi-process gRPC federations).
# Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/ensure-env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
