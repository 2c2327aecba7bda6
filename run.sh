#!/usr/bin/env bash
# The main job: a whole LBGM federation on this machine (server + worker processes
# over gRPC on localhost, embedded MNIST). Extra arguments go to `lbgm run`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/ensure-env.sh"
exec "$root/.venv/bin/lbgm" run "$@"
