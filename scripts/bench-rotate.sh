#!/usr/bin/env bash
# Rotation sweep and CRL throughput (issue 4's figures), release build, durable SQLite:
# 1. provision DEVICES generated-key P-256 devices (30-day certificates);
# 2. one `fleetcert rotate --within 60d` sweep: every certificate is due, and for each
#    the worker signs a replacement with a new key, seals the key (AES-256-GCM), and
#    commits it under its lease — the figure is replacements committed per second;
# 3. every replaced certificate is marked revoked (directly in SQLite, standing in for
#    DEVICES devices confirming their rotation), then `fleetcert crl` publishes a CRL
#    with DEVICES entries — the figure is the wall time of that command (registry read,
#    CRL signing, storing it), plus the CRL size.
#   usage: scripts/bench-rotate.sh [DEVICES]
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-100000}
cargo build --release --quiet -p fleetcert
bin=$PWD/target/release/fleetcert
work=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-bench-rotate.XXXXXX")
trap 'rm -rf "$work"' EXIT
export FLEETCERT_DATA_DIR="$work/data"
{ echo thing_name; seq -f 'rot-device-%07g' 1 "$devices"; } > "$work/pallet.csv"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores" >&2
"$bin" ca init --crl-url http://127.0.0.1:9090/crl >/dev/null
"$bin" --output json provision --batch "$work/pallet.csv" --days 30 --out "$work/out" | tail -n 1 \
    | python3 -c 'import json,sys; s=json.load(sys.stdin); print("provisioned %d devices in %.1fs" % (s["issued"], s["elapsed_seconds"]))' >&2
"$bin" --output json rotate --within 60d | tee "$work/rotate.json" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); p=r["phases"]; print("rotation sweep: %d due, %d replacements issued in %.2fs = %.0f rotations/s (failed %d); open %.2fs, claim %.2fs, sign+seal %.2fs, commit %.2fs" % (r["opened"], r["issued"], r["seconds"], r["issued_per_second"], r["failed"], p["open_seconds"], p["claim_seconds"], p["sign_seconds"], p["commit_seconds"]))'
python3 - "$work/data/registry.db" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1])
now = int(time.time())
with db:
    n = db.execute("UPDATE certificates SET status='revoked', revoked_at=?, revocation_reason='superseded' "
                   "WHERE replaces IS NULL AND status != 'revoked'", (now,)).rowcount
print("marked %d replaced certificates revoked" % n, file=sys.stderr)
PY
start=$(date +%s.%N)
"$bin" --output json crl --der --out "$work/crl.der" > "$work/crl.json"
end=$(date +%s.%N)
python3 - "$work/crl.json" "$start" "$end" "$work/crl.der" <<'PY'
import json, os, sys
c = json.load(open(sys.argv[1]))
took = float(sys.argv[3]) - float(sys.argv[2])
print("CRL #%d with %d entries (%d bytes): `fleetcert crl` took %.3fs (process start, registry read, signing, storing)"
      % (c["number"], c["entries"], os.path.getsize(sys.argv[4]), took))
PY
openssl crl -inform DER -in "$work/crl.der" -noout -text | grep -c "Serial Number" \
    | xargs -I{} echo "openssl reads {} entries" >&2
