#!/usr/bin/env bash
# The test command: installs missing services, then runs every test (unit tests, and the
# end-to-end suite against private PostgreSQL and SeaweedFS servers the harness starts).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-services.sh
cargo test --locked --workspace --lib --bins --tests "$@"
