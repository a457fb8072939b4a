#!/usr/bin/env bash
# The embedded default, end to end: a private local PostgreSQL loaded with the reference data,
# a local directory repository, `init` (publication, slot, first snapshot), the capture daemon,
# a mistake that deletes one tenant's data, and a point-in-time restore of that tenant to just
# before the mistake into a new database, compared row by row with the state it had then.
#
#   scripts/demo.sh          run it (re-running reuses the cluster, the repository and its
#                            stream: `init` has nothing to do, the daemon resumes where it
#                            stopped, and the mistake hits another tenant)
#   scripts/demo.sh config   (re)write .demo/updog-backup.toml, print how to continue by hand
#   scripts/demo.sh stop     stop the demo's daemon and PostgreSQL
#   scripts/demo.sh clean    stop them and delete .demo/
#
# Everything lives in .demo/ (git-ignored; UPDOG_DEMO_DIR elsewhere), the settings in
# .demo/updog-backup.toml (no secret: the identity is .demo/identity.txt, mode 0600). Nothing
# listens beyond 127.0.0.1 (PostgreSQL on UPDOG_DEMO_PORT, 54329; the daemon on 9187).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
demo=${UPDOG_DEMO_DIR:-$root/.demo}
port=${UPDOG_DEMO_PORT:-54329}
# Where `cargo build` puts the binary (CARGO_TARGET_DIR, relative to the checkout, or target/).
target_dir=${CARGO_TARGET_DIR:-target}
case "$target_dir" in /*) ;; *) target_dir=$root/$target_dir ;; esac
updog=$target_dir/debug/updog-backup
config=$demo/updog-backup.toml

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
# As root the server runs as `postgres`, which may not reach a checkout under /root: then its
# data lives under /var/tmp instead.
pgdata=$demo/pg
if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$root"; then
  # (Another UPDOG_DEMO_DIR, another cluster: never the default demo's.)
  pgdata=/var/tmp/updog-backup-demo${UPDOG_DEMO_DIR:+-$(printf %s "$demo" | md5sum | cut -c1-8)}/pg
fi

# The demo's settings as a config file, so that every command can be run by hand after it:
# config/embedded.toml with the demo's port, repository and keys.
write_config() {
  cat > "$config" <<TOML
# Written by scripts/demo.sh: config/embedded.toml with the demo's port, repository and keys.
# No secret in it: the identity is in its own file (mode 0600), and no password is needed
# (the demo's cluster trusts 127.0.0.1).
[source]
url = "postgres://updog_backup@127.0.0.1:$port/updog"
schemas = ["app", "audit"]
global_tables = ["app.currencies"]

[storage]
url = "file://$demo/repo"

[encryption]
recipients = ["$(cat "$demo/recipient.txt")"]
identity_file = "$demo/identity.txt"

[stream]
# A pack every second (default 5 s), so that the demo's restore does not wait.
flush_interval = "1s"

[restore]
target_url = "postgres://updog_restore@127.0.0.1:$port/postgres"
TOML
}

# How to go on from here, every line copy-pasteable.
print_by_hand() {
  local org=${1:-}
  [ -n "$org" ] || org='<ORG>'
  cat <<HAND

== continue by hand: the demo's settings are in $config
  export UPDOG_BACKUP_CONFIG=$config PATH="$(dirname "$updog"):\$PATH"
  updog-backup list --tenants                 # every tenant, its size and restorable window
  updog-backup daemon >>$demo/daemon.log 2>&1 & echo \$! >$demo/daemon.pid   # capture again (scripts/demo.sh stop stops it)
  updog-backup list --org $org    # its snapshots, its window, and whether the daemon runs
  updog-backup restore --org $org --latest   # everything stored, into a new database
  psql -h 127.0.0.1 -p $port -U postgres -d updog    # the source: more changes, or mistakes
README.md "In an incident" walks through a whole restore with these commands.
HAND
}

# Stops a daemon started earlier (by the demo or by hand) and waits until it is gone: it stores
# its open pack first, and a new one started meanwhile would find server.listen taken.
stop_earlier_daemon() {
  [ -f "$demo/daemon.pid" ] || return 0
  local pid; pid=$(cat "$demo/daemon.pid")
  rm -f "$demo/daemon.pid"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  echo "the daemon (pid $pid) did not stop within 20 s" >&2; return 1
}

case "${1:-run}" in
  stop)
    stop_earlier_daemon
    # Quietly when it is not running (after an earlier stop, or never started).
    if [ -d "$pgdata" ] && as_owner "$(pg_bin)/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
      as_owner "$(pg_bin)/pg_ctl" -D "$pgdata" stop -m fast >/dev/null && echo "stopped the demo's PostgreSQL"
    fi
    exit 0 ;;
  clean)
    "$0" stop; rm -rf "$demo" "$pgdata"
    case "$pgdata" in "$demo"/*) echo "deleted $demo" ;; *) echo "deleted $demo and $pgdata" ;; esac
    exit 0 ;;
  config)
    if [ ! -f "$demo/recipient.txt" ]; then echo "no demo in $demo yet: run scripts/demo.sh first" >&2; exit 1; fi
    write_config
    echo "wrote $config"
    print_by_hand "$(cat "$demo/tenant.txt" 2>/dev/null || true)"
    exit 0 ;;
  run) ;;
  *) echo "usage: $0 [run|config|stop|clean]" >&2; exit 2 ;;
esac

scripts/test-services.sh --postgres-only
bin=$(pg_bin)
echo "== building updog-backup"
cargo build --quiet --bin updog-backup

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
write_config
echo "== settings: $config"
export UPDOG_BACKUP_CONFIG=$config

run() { echo; echo "\$ updog-backup $*"; "$updog" "$@"; }
# What the DBA does once, as the tables' owner: the publication, and the replica identities
# `check` asks for (so that every DELETE can be routed to its tenant); as a superuser, the
# event triggers that put schema changes into the stream (restores follow migrations).
"$updog" schema-triggers | psql_ -d updog
psql_ -d updog -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'updog_backup')
  THEN CREATE PUBLICATION updog_backup FOR TABLES IN SCHEMA app, audit; END IF; END \$\$" \
  -c "ALTER TABLE app.users REPLICA IDENTITY FULL; ALTER TABLE app.fund_permissions REPLICA IDENTITY FULL;
      ALTER TABLE app.portfoliocompanies REPLICA IDENTITY FULL; ALTER TABLE app.investment_lots REPLICA IDENTITY FULL;
      ALTER TABLE app.reserve_allocations REPLICA IDENTITY FULL; ALTER TABLE app.forecast_snapshots REPLICA IDENTITY FULL;"
run check || true
run init

echo; echo "\$ updog-backup daemon &   (log: $demo/daemon.log)"
stop_earlier_daemon
"$updog" daemon >"$demo/daemon.log" 2>&1 &
daemon_pid=$!
echo "$daemon_pid" > "$demo/daemon.pid"
stop_daemon() { kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null || true; rm -f "$demo/daemon.pid"; }
trap stop_daemon EXIT

# The tenant with the most investments now (a rerun picks one the previous mistake spared).
org=$(psql_ -d updog -tAc "SELECT f.organization_id FROM app.investments i JOIN app.funds f ON f.id = i.fund_id
  GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1")
name=$(psql_ -d updog -tAc "SELECT name FROM app.organizations WHERE id = '$org'")
echo "$org" > "$demo/tenant.txt"
in_funds="fund_id IN (SELECT id FROM app.funds WHERE organization_id = '$org')"
echo; echo "== ordinary work for tenant $org ($name): new investments, updated funds"
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
echo; echo "== the mistake: every investment of tenant $org ($name) deleted (lots cascade), audit trail wiped"
psql_ -d updog -c "DELETE FROM app.reserve_allocations WHERE $in_funds" \
  -c "DELETE FROM app.investments WHERE $in_funds" -c "DELETE FROM audit.events WHERE organization_id = '$org'"

echo; echo "== waiting for the daemon to store everything up to $at"
for _ in $(seq 1 120); do
  if ! kill -0 "$daemon_pid" 2>/dev/null; then
    echo "the daemon exited; the end of $demo/daemon.log:" >&2; tail -3 "$demo/daemon.log" >&2; exit 1
  fi
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
  echo "demo complete: tenant $org ($name) restored to $at, just before the mistake: identical to the source then, no other tenant's rows."
  echo "look at it: psql -h 127.0.0.1 -p $port -U postgres -d $target"
fi
print_by_hand "$org"
echo "stop the demo (daemon and PostgreSQL) with: scripts/demo.sh stop; delete it with: scripts/demo.sh clean"
exit "$mismatch"
