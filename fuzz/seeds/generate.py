#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets (fuzz/seeds/<target>/), valid or nearly valid
objects that get the fuzzer past the first checks at once. The files are checked in; run this
again (python3 fuzz/seeds/generate.py, needs the zstd tool) only after a format change.

Format version 2 (FORMAT.md): manifests carry a `digest` of their canonical JSON and an `id`
naming their consistent point, routing checkpoints name their LSN in their header.

Each target reads its first input byte as a mode (see the target's doc comment), so seeds start
with a mode digit: "0" (48) is mode 0 of 3 or 4, "1" (49) mode 1, "2" (50) mode 2, "3" (51) is
mode 3 of 4. Seeds named *-refused are nearly valid on purpose (one check refuses them), as
are the edge-value seeds commented below."""

import hashlib
import json
import os
import struct
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
FORMAT_VERSION = 2


def write(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


def compact(value):
    return json.dumps(value, separators=(",", ":")).encode()


def lsn_text(lsn):
    """PostgreSQL's X/Y spelling, as the LSNs in JSON are written."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_key(lsn):
    """16 uppercase hex digits, as the LSNs in keys and snapshot ids are written."""
    return f"{lsn:016X}"


# pack_footer: a pack keyed changes/0000000000000100-0000000000000200.pack.
def section(tenant, offset, length):
    return {"tenant": tenant, "offset": offset, "length": length, "sha256": "00" * 32,
            "first_lsn": "0/100", "last_lsn": "0/1F8",
            "first_time": "2026-11-26T10:41:07Z", "last_time": "2026-11-26T10:41:07.5Z",
            "transactions": 1, "changes": 3}


def footer(sections, routes=None, version=FORMAT_VERSION):
    value = {"format_version": version, "start_lsn": "0/100", "end_lsn": "0/200",
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
# Nearly valid: a footer of format version 1, which this version's readers refuse.
write("pack_footer", "json-format-1-refused", b"1\x00" + footer([], version=1))


# manifest: manifests that parse under the target's key, nearly valid ones, and one repo.json.
def content_digest(value):
    """manifest::content_digest: SHA-256 (hex) of the canonical JSON of the manifest without
    its digest: keys sorted by their UTF-8 bytes (code point order is the same order), no
    whitespace, strings escaped only where JSON requires it (serde_json and json.dumps with
    ensure_ascii=False escape the same characters the same way: \\" \\\\ \\b \\f \\n \\r \\t,
    other control characters as lowercase \\u00xx), integers as decimal digits."""
    assert "digest" not in value
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def sealed(value):
    """The manifest with its digest, as Manifest::to_json stores it (digest last)."""
    return dict(value, digest=content_digest(value))


def snapshot_id(time, lsn):
    """SnapshotId::new: consistent_time to the second (time is "YYYY-MM-DDTHH:MM:SS…Z"), then
    the consistent LSN as a key."""
    date, clock = time.split("T")
    return f"{date.replace('-', '')}T{clock[:8].replace(':', '')}Z-{lsn_key(lsn)}"


CONSISTENT_LSN = 0x16B3748A
CONSISTENT_TIME = "2026-11-26T12:00:00.25Z"
ID = snapshot_id(CONSISTENT_TIME, CONSISTENT_LSN)
assert ID == "20261126T120000Z-0000000016B3748A"  # the target's fixed key


def tenant_key(tenant):
    """keys::tenant: bytes outside [A-Za-z0-9_-] as %XX."""
    ok = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    encoded = "".join(chr(b) if b in ok else f"%{b:02X}" for b in tenant.encode("utf-8"))
    return f"snapshots/{ID}/tenants/{encoded}.zst.age"


def manifest(tenants=("6f1c2a52-0b8e-4d4e-9a1f-1d2c3b4a5f60",), **fields):
    archive = {"key": f"snapshots/{ID}/global.zst.age", "bytes": 1234, "sha256": "ab" * 32,
               "rows": {"app.plans": 3}}
    value = {
        "format_version": FORMAT_VERSION, "id": ID,
        "system_identifier": "7441234567890123456", "database": "updog",
        "server_version_num": 150018, "tenant_column": "organization_id", "tenant_type": "uuid",
        "consistent_lsn": lsn_text(CONSISTENT_LSN), "consistent_time": CONSISTENT_TIME,
        "started_at": "2026-11-26T12:00:00Z", "finished_at": "2026-11-26T12:00:09.5Z",
        "all_tenants": True,
        "tables": [
            {"schema": "app", "name": "funds", "scope": "tenant", "route": "organization_id",
             "columns": ["id", "organization_id", "name"]},
            {"schema": "app", "name": "plans", "scope": "global", "columns": ["id"]},
            {"schema": "app", "name": "cache", "scope": "excluded", "columns": []},
        ],
        "sequences": [{"schema": "app", "name": "funds_id_seq", "last_value": 42,
                       "is_called": True}],
        "schema": {"key": f"snapshots/{ID}/schema.sql.zst.age", "bytes": 999, "sha256": "cd" * 32},
        "global": archive,
        "tenants": {t: dict(archive, key=tenant_key(t), rows={"app.funds": 2}) for t in tenants},
    }
    value.update(fields)
    return value


def pretty(value, ascii_only=False):
    return json.dumps(value, indent=2, ensure_ascii=ascii_only).encode("utf-8")


write("manifest", "manifest.json", pretty(sealed(manifest())))
# Text tenant values that need escaping in the canonical JSON (a quote, a backslash, control
# characters, non-ASCII up to outside the BMP, U+2028), in a file that escapes everything
# non-ASCII too (\u00e9, surrogate pairs): layout, escapes included, is not content.
odd = ["t\u00e9\"1\n", "back\\slash\ttab\x01\x1f\x7f", "\U0001F436\u2028\u00ff", "plain"]
write("manifest", "manifest-escapes.json",
      pretty(sealed(manifest(tenants=odd, tenant_type="text",
                             sequences=[{"schema": "app", "name": "s\u00e9q", "last_value": -1,
                                         "is_called": False}])), ascii_only=True))
# Compact, keys in canonical order, a consistent_time at the id's second exactly.
exact = manifest(consistent_time="2026-11-26T12:00:00Z")
write("manifest", "manifest-compact.json",
      json.dumps(sealed(exact), sort_keys=True, separators=(",", ":")).encode())
# Nearly valid: one check each refuses them (the target reseals every input, so the fuzzer
# also gets past the digest of the first two).
tampered = sealed(manifest())
tampered["sequences"][0]["last_value"] = 43  # one digit changed after sealing
write("manifest", "manifest-digest-refused.json", pretty(tampered))
# A consistent point other than the id's, under a digest that matches: the LSN as format 1
# seeds spelled it (16/B3748A is 0x16_00B3748A, not the id's 0x16B3748A).
write("manifest", "manifest-id-refused.json",
      pretty(sealed(manifest(consistent_lsn="16/B3748A"))))
old = manifest(format_version=1)  # format 1: no digest
write("manifest", "manifest-format-1-refused.json", pretty(old))
write("manifest", "repo.json", pretty({
    "format_version": FORMAT_VERSION, "system_identifier": "7441234567890123456",
    "database": "updog", "tenant_column": "organization_id", "recipients": ["3c1f0a2b4d5e6f70"],
    "created_at": "2026-11-26T11:00:00Z"}))

# routes: routing state with every operation (Clear, Set, Set to no tenant, Remove), raw and as
# stored, as a checkpoint (its header names the LSN of the target's key,
# changes/routes-00000016B3748A00.zst) and as a pack's routing region (no LSN). The target reads
# every input both ways, so each is accepted by one reader and refused by the other.
KEY_LSN = 0x16B3748A00
OPS = (b"C" + struct.pack("<I", 0)
       + b"S" + struct.pack("<I", 0) + b"\x07" * 16 + struct.pack("<I", 0)
       + b"N" + struct.pack("<I", 0) + b"\x08" * 16
       + b"R" + struct.pack("<I", 0) + b"\x07" * 16)
OPERATIONS = 4


def header(lsn=None, operations=OPERATIONS):
    value = {"maps": ["app.funds(id)"], "tenants": ["t1"], "operations": operations}
    if lsn is not None:
        value["lsn"] = lsn_text(lsn)
    return compact(value)


def plaintext(head):
    return b"UPDOGRT\x01" + struct.pack("<I", len(head)) + head + OPS


def stored(plain):
    return subprocess.run(["zstd", "-q", "-c", "-3"], input=plain + hashlib.sha256(plain).digest(),
                          capture_output=True, check=True).stdout


for kind, lsn in [("checkpoint", KEY_LSN), ("region", None)]:
    head = header(lsn)
    write("routes", f"plain-{kind}", b"1" + plaintext(head))
    write("routes", f"header-{kind}", b"2" + head + OPS)
    write("routes", f"stored-{kind}", b"0" + stored(plaintext(head)))
write("routes", "deltas", b"3" + bytes(range(64)))
# Nearly valid: an older checkpoint stored under a newer key.
write("routes", "header-checkpoint-older-refused", b"2" + header(KEY_LSN - 0x100) + OPS)
# Edge values: an operation count no input can hold (the decoder must not reserve room for it).
for name, count in [("header-count-2e32", 2**32), ("header-count-max", 2**64 - 1)]:
    write("routes", name, b"2" + header(operations=count) + OPS)
    write("routes", f"{name}-checkpoint", b"2" + header(KEY_LSN, operations=count) + OPS)
