#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets (fuzz/seeds/<target>/), valid or nearly valid
objects that get the fuzzer past the first checks at once. The files are checked in; run this
again (python3 fuzz/seeds/generate.py, needs the zstd tool) only after a format change.

Each target reads its first input byte as a mode (see the target's doc comment), so seeds start
with a mode digit: "0" (48) is mode 0 of 3 or 4, "1" (49) mode 1, "2" (50) mode 2, "3" (51) is
mode 3 of 4."""

import hashlib
import json
import os
import struct
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


def compact(value):
    return json.dumps(value, separators=(",", ":")).encode()


# pack_footer: a pack keyed changes/0000000000000100-0000000000000200.pack.
def section(tenant, offset, length):
    return {"tenant": tenant, "offset": offset, "length": length, "sha256": "00" * 32,
            "first_lsn": "0/100", "last_lsn": "0/1F8",
            "first_time": "2026-11-26T10:41:07Z", "last_time": "2026-11-26T10:41:07.5Z",
            "transactions": 1, "changes": 3}


def footer(sections, routes=None):
    value = {"format_version": 1, "start_lsn": "0/100", "end_lsn": "0/200",
             "covered_until": "2026-11-26T10:41:07.5Z", "sections": sections}
    if routes:
        value["routes"] = {"offset": routes[0], "length": routes[1], "sha256": "11" * 32}
    return compact(value)


def trailer(json_bytes):
    return struct.pack("<I", len(json_bytes)) + hashlib.sha256(json_bytes).digest() + b"UPDOGPK\x01"


FILLER = 48  # the byte "0" as mode 1's filler length
with_routes = footer([section("t1", 0, 30), section(None, 30, 10)], routes=(40, 8))
global_only = footer([section(None, 0, 48)])
write("pack_footer", "json-with-routes", b"1" + bytes([FILLER]) + with_routes)
write("pack_footer", "json-global-only", b"1" + bytes([FILLER]) + global_only)
write("pack_footer", "json-empty", b"1\x00" + footer([]))
write("pack_footer", "pack-with-routes", b"0" + b"\x00" * FILLER + with_routes + trailer(with_routes))
write("pack_footer", "pack-empty", b"0" + footer([]) + trailer(footer([])))
# Edge values: a section length that overflows offset + length (the reader must refuse it).
write("pack_footer", "json-length-overflow",
      b"1\x02" + footer([section(None, 0, 1), section(None, 1, 2**64 - 1), section(None, 0, 2)]))

# manifest: one manifest that parses under the target's key, and one repo.json.
archive = {"key": "snapshots/20261126T120000Z-0000000016B3748A/global.zst.age", "bytes": 1234,
           "sha256": "ab" * 32, "rows": {"app.plans": 3}}
manifest = {
    "format_version": 1, "id": "20261126T120000Z-0000000016B3748A",
    "system_identifier": "7441234567890123456", "database": "updog",
    "server_version_num": 150018, "tenant_column": "organization_id", "tenant_type": "uuid",
    "consistent_lsn": "16/B3748A", "consistent_time": "2026-11-26T12:00:00.25Z",
    "started_at": "2026-11-26T12:00:00Z", "finished_at": "2026-11-26T12:00:09.5Z",
    "all_tenants": True,
    "tables": [
        {"schema": "app", "name": "funds", "scope": "tenant", "route": "organization_id",
         "columns": ["id", "organization_id", "name"]},
        {"schema": "app", "name": "plans", "scope": "global", "columns": ["id"]},
        {"schema": "app", "name": "cache", "scope": "excluded", "columns": []},
    ],
    "sequences": [{"schema": "app", "name": "funds_id_seq", "last_value": 42, "is_called": True}],
    "schema": {"key": "snapshots/20261126T120000Z-0000000016B3748A/schema.sql.zst.age",
               "bytes": 999, "sha256": "cd" * 32},
    "global": archive,
    "tenants": {"6f1c2a52-0b8e-4d4e-9a1f-1d2c3b4a5f60": dict(
        archive, key="snapshots/20261126T120000Z-0000000016B3748A/tenants/"
                     "6f1c2a52-0b8e-4d4e-9a1f-1d2c3b4a5f60.zst.age", rows={"app.funds": 2})},
}
write("manifest", "manifest.json", json.dumps(manifest, indent=2).encode())
write("manifest", "repo.json", json.dumps({
    "format_version": 1, "system_identifier": "7441234567890123456", "database": "updog",
    "tenant_column": "organization_id", "recipients": ["3c1f0a2b4d5e6f70"],
    "created_at": "2026-11-26T11:00:00Z"}, indent=2).encode())

# routes: the plaintext of a checkpoint (Clear, Set, Remove), raw and as stored.
header = compact({"maps": ["app.funds(id)"], "tenants": ["t1"], "operations": 3})
plain = b"UPDOGRT\x01" + struct.pack("<I", len(header)) + header
plain += b"C" + struct.pack("<I", 0)
plain += b"S" + struct.pack("<I", 0) + b"\x07" * 16 + struct.pack("<I", 0)
plain += b"R" + struct.pack("<I", 0) + b"\x07" * 16
write("routes", "plain-checkpoint", b"1" + plain)
write("routes", "header-checkpoint", b"2" + plain[12:])
stored = subprocess.run(["zstd", "-q", "-c", "-3"], input=plain + hashlib.sha256(plain).digest(),
                        capture_output=True, check=True).stdout
write("routes", "stored-checkpoint", b"0" + stored)
write("routes", "deltas", b"3" + bytes(range(64)))
# Edge values: an operation count no input can hold (the decoder must not reserve room for it).
for name, count in [("header-count-2e32", 2**32), ("header-count-max", 2**64 - 1)]:
    huge = compact({"maps": ["app.funds(id)"], "tenants": ["t1"], "operations": count})
    write("routes", name, b"2" + huge + plain[12 + len(header):])
