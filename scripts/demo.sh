#!/usr/bin/env bash
# The embedded default, end to end: a private local PostgreSQL loaded with the reference data,
# a local directory repository, `init` (publication, slot, first snapshot), the capture daemon,
# a mistake that deletes one tenant's data, and a point-in-time restore of that tenant to just
# before the mistake into a new database, compared row by row with the state it had then.
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
  stop)
    [ -f "$demo/daemon.pid" ] && kill "$(cat "$demo/daemon.pid")" 2>/dev/null || true
    [ -d "$pgdata" ] && as_owner "$(pg_bin)/pg_ctl" -D "$pgdata" stop -m fast || true; exit 0 ;;
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
# What the DBA does once, as the tables' owner: the publication, and the replica identities
# `check` asks for (so that every DELETE can be routed to its tenant).
psql_ -d updog -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'updog_backup')
  THEN CREATE PUBLICATION updog_backup FOR TABLES IN SCHEMA app, audit; END IF; END \$\$" \
  -c "ALTER TABLE app.users REPLICA IDENTITY FULL; ALTER TABLE app.fund_permissions REPLICA IDENTITY FULL;
      ALTER TABLE app.portfoliocompanies REPLICA IDENTITY FULL; ALTER TABLE app.investment_lots REPLICA IDENTITY FULL;
      ALTER TABLE app.reserve_allocations REPLICA IDENTITY FULL; ALTER TABLE app.forecast_snapshots REPLICA IDENTITY FULL;"
run check || true
run init

echo; echo "\$ updog-backup daemon &   (log: $demo/daemon.log)"
[ -f "$demo/daemon.pid" ] && kill "$(cat "$demo/daemon.pid")" 2>/dev/null && sleep 1 || true
UPDOG_BACKUP__STREAM__FLUSH_INTERVAL=1s "$updog" daemon >"$demo/daemon.log" 2>&1 &
daemon_pid=$!
echo "$daemon_pid" > "$demo/daemon.pid"
stop_daemon() { kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null || true; rm -f "$demo/daemon.pid"; }
trap stop_daemon EXIT

# The tenant with the most investments now (a rerun picks one the previous mistake spared).
org=$(psql_ -d updog -tAc "SELECT f.organization_id FROM app.investments i JOIN app.funds f ON f.id = i.fund_id
  GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1")
in_funds="fund_id IN (SELECT id FROM app.funds WHERE organization_id = '$org')"
echo; echo "== ordinary work for tenant $org: new investments, updated funds"
psql_ -d updog -c "UPDATE app.funds SET size_cents = size_cents + 1 WHERE organization_id = '$org'" \
  -c "INSERT INTO app.investment_lots (investment_id, shares, price_per_share_cents, acquired_on)
      SELECT id, 10, 100, current_date FROM app.investments WHERE $in_funds"
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
declare -A before
for entry in "${filters[@]}"; do before[${entry%%|*}]=$(digest updog "${entry%%|*}" "${entry#*|}"); done
at=$(psql_ -d updog -tAc "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
echo "state recorded at $at"
echo; echo "== the mistake: every investment of tenant $org deleted (lots cascade), audit trail wiped"
psql_ -d updog -c "DELETE FROM app.reserve_allocations WHERE $in_funds" \
  -c "DELETE FROM app.investments WHERE $in_funds" -c "DELETE FROM audit.events WHERE organization_id = '$org'"

echo; echo "== waiting for the daemon to store everything up to $at"
for _ in $(seq 1 120); do
  covered=$("$updog" list --json | sed -n 's/.*"covered_until": *"\([^"]*\)".*/\1/p' | head -1)
  if [ -n "$covered" ] && [ "$(date -d "$covered" +%s%N)" -ge "$(date -d "$at" +%s%N)" ]; then break; fi
  sleep 0.5
done
run list --org "$org"
if command -v curl >/dev/null; then
  echo; echo "\$ curl -s 127.0.0.1:9187/status"
  curl -s 127.0.0.1:9187/status; echo
  echo; echo "\$ curl -s 127.0.0.1:9187/metrics | grep -E '^updog_backup_(active|changes_captured_total|packs_stored_total|stream_lag_seconds) '"
  curl -s 127.0.0.1:9187/metrics | grep -E '^updog_backup_(active|changes_captured_total|packs_stored_total|stream_lag_seconds)[ {]' || true
fi
target="demo_$(date +%Y%m%d%H%M%S)"
run restore --org "$org" --at "$at" --target-db "$target"
run verify --deep
stop_daemon
trap - EXIT

echo
echo "== comparing tenant $org row by row: the source as it was at $at vs $target"
mismatch=0
for entry in "${filters[@]}"; do
  table=${entry%%|*}
  expected=${before[$table]}
  found=$(digest "$target" "$table" true)
  if [ "$expected" = "$found" ]; then verdict=identical; else verdict="DIFFERENT (source: $expected)"; mismatch=1; fi
  printf '  %-26s %7s rows  %s\n' "$table" "${found%% *}" "$verdict"
done
if [ "$mismatch" = 0 ]; then
  echo "demo complete: tenant $org restored to $at, just before the mistake: identical to the source then, no other tenant's rows."
  echo "look at it: psql -h 127.0.0.1 -p $port -U postgres -d $target"
fi
echo "stop the demo's PostgreSQL with: scripts/demo.sh stop"
exit "$mismatch"
