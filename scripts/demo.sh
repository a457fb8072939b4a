#!/usr/bin/env bash
# The embedded default, end to end: a private local PostgreSQL loaded with the reference data,
# a local directory repository, a backup of every tenant and a restore of one tenant into a new
# database, then a row-by-row comparison with the source.
#
#   scripts/demo.sh          run it (idempotent: re-running takes another snapshot)
#   scripts/demo.sh stop     stop the demo's PostgreSQL
#   scripts/demo.sh clean    stop it and delete .demo/
#
# Everything lives in .demo/ (git-ignored). Nothing listens beyond 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
demo=$root/.demo
port=${UPDOG_DEMO_PORT:-54329}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
# As root the server runs as `postgres`, which may not reach a checkout under /root: then its
# data lives under /var/tmp instead.
pgdata=$demo/pg
if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$root"; then
  pgdata=/var/tmp/updog-backup-demo/pg
fi

case "${1:-run}" in
  stop) [ -d "$pgdata" ] && as_owner "$(pg_bin)/pg_ctl" -D "$pgdata" stop -m fast || true; exit 0 ;;
  clean) "$0" stop; rm -rf "$demo" "$pgdata"; exit 0 ;;
  run) ;;
  *) echo "usage: $0 [run|stop|clean]" >&2; exit 2 ;;
esac

scripts/test-services.sh --postgres-only
bin=$(pg_bin)
echo "== building updog-backup"
cargo build --quiet --bin updog-backup
updog=$root/target/debug/updog-backup

mkdir -p "$demo"
if [ ! -d "$pgdata" ]; then
  echo "== creating a private PostgreSQL cluster in $pgdata (port $port)"
  mkdir -p "$pgdata"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$pgdata"; fi
  as_owner "$bin/initdb" -D "$pgdata" -A trust -U postgres --no-sync >/dev/null
fi
if ! as_owner "$bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
  as_owner "$bin/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" -w -o \
    "-p $port -k $pgdata -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10" \
    start >/dev/null
fi
psql_() { "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
if [ "$(psql_ -d postgres -tAc "SELECT count(*) FROM pg_database WHERE datname = 'updog'")" = 0 ]; then
  echo "== loading the reference schema and data (20 tenants)"
  psql_ -d postgres -c "CREATE DATABASE updog"
  psql_ -d updog -f tests/fixtures/updog_schema.sql
  psql_ -d updog -v tenants=20 -v scale=0.5 -f tests/fixtures/updog_data.sql
fi

if [ ! -f "$demo/identity.txt" ]; then
  "$updog" keygen --output "$demo/identity.txt" > "$demo/recipient.txt"
fi
export UPDOG_BACKUP_CONFIG=$root/config/embedded.toml
export UPDOG_BACKUP__SOURCE__URL="postgres://updog_backup@127.0.0.1:$port/updog"
export UPDOG_BACKUP__RESTORE__TARGET_URL="postgres://updog_restore@127.0.0.1:$port/postgres"
export UPDOG_BACKUP__STORAGE__URL="file://$demo/repo"
export UPDOG_BACKUP__ENCRYPTION__RECIPIENTS="[\"$(cat "$demo/recipient.txt")\"]"
export UPDOG_BACKUP__ENCRYPTION__IDENTITY_FILE="$demo/identity.txt"

run() { echo; echo "\$ updog-backup $*"; "$updog" "$@"; }
run init
run check || true
run backup
org=$(psql_ -d updog -tAc "SELECT md5('org-1')::uuid")
run list --org "$org"
target="demo_$(date +%Y%m%d%H%M%S)"
run restore --org "$org" --latest --target-db "$target"
run verify --deep

echo
echo "== comparing tenant $org row by row: source updog vs $target"
in_funds="fund_id IN (SELECT id FROM app.funds WHERE organization_id = '$org')"
filters=(
  "app.currencies|true"
  "app.organizations|id = '$org'"
  "app.users|organization_id = '$org'"
  "app.funds|organization_id = '$org'"
  "app.fund_permissions|organization_id = '$org'"
  "audit.events|organization_id = '$org'"
  "app.fundconfigs|$in_funds"
  "app.portfoliocompanies|$in_funds"
  "app.investments|$in_funds"
  "app.forecast_snapshots|$in_funds"
  "app.reserve_allocations|$in_funds"
  "app.investment_lots|investment_id IN (SELECT id FROM app.investments WHERE $in_funds)"
)
digest() { psql_ -d "$1" -tAc "SELECT count(*) || ' ' || coalesce(md5(string_agg(r::text, E'\n' ORDER BY r::text)), '-') FROM (SELECT * FROM $2 WHERE $3) r"; }
mismatch=0
for entry in "${filters[@]}"; do
  table=${entry%%|*}; filter=${entry#*|}
  expected=$(digest updog "$table" "$filter")
  found=$(digest "$target" "$table" true)
  if [ "$expected" = "$found" ]; then verdict=identical; else verdict="DIFFERENT (source: $expected)"; mismatch=1; fi
  printf '  %-26s %7s rows  %s\n' "$table" "${found%% *}" "$verdict"
done
if [ "$mismatch" = 0 ]; then
  echo "demo complete: tenant $org restored, identical to the source, no other tenant's rows."
  echo "look at it: psql -h 127.0.0.1 -p $port -U postgres -d $target"
fi
echo "stop the demo's PostgreSQL with: scripts/demo.sh stop"
exit "$mismatch"
