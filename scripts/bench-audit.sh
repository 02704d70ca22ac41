#!/usr/bin/env bash
# Device Defender audit over a large fleet (issue 16's figure), release build, durable SQLite:
# 1. provision DEVICES generated-key P-256 devices (things + certificates in the registry);
# 2. give the fleet something to find, directly in SQLite (standing in for months of
#    traffic): one MQTT session record per device over the last day (client id = thing
#    name), of which 1 % share a certificate with another client id at an overlapping time
#    and 1 % reuse another device's client id; 2 % of the certificates expire within 30
#    days and 0.5 % are past expiry;
# 3. `fleetcert audit run` (every check) RUNS times: wall time of the whole command and its
#    peak RSS (/usr/bin/time), with the task's counts per check.
#   usage: scripts/bench-audit.sh [DEVICES] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-100000}
runs=${2:-3}
case $devices$runs in *[!0-9]*) echo "usage: scripts/bench-audit.sh [DEVICES] [RUNS]" >&2; exit 2 ;; esac
[ -x /usr/bin/time ] || { echo "bench-audit: needs /usr/bin/time (Debian package time)" >&2; exit 1; }
cargo build --release --quiet -p fleetcert
bin=$PWD/target/release/fleetcert
work=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-bench-audit.XXXXXX")
trap '[ "${KEEP_WORK:-0}" = 1 ] && echo "kept $work" >&2 || rm -rf "$work"' EXIT
export FLEETCERT_DATA_DIR="$work/data"
{ echo thing_name; seq -f 'aud-device-%07g' 1 "$devices"; } >"$work/pallet.csv"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; HEAD $(git rev-parse --short HEAD)" >&2
"$bin" ca init >/dev/null
"$bin" --output json provision --batch "$work/pallet.csv" --out "$work/out" | tail -n 1 |
    python3 -c 'import json,sys; s=json.load(sys.stdin); print("provisioned %d devices in %.1fs" % (s["issued"], s["elapsed_seconds"]))' >&2
rm -rf "$work/out" # the files are not needed; the registry is

python3 - "$work/data/registry.db" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1])
now = int(time.time())
certs = db.execute("SELECT serial, fingerprint_sha256, thing_name FROM certificates ORDER BY serial").fetchall()
n = len(certs)
rows = []
for i, (serial, fp, thing) in enumerate(certs):
    at = now - 86400 + (i * 86400) // n
    rows.append((fp, thing, "127.0.0.1:%d" % (1024 + i % 60000), at, "mqtt", thing, at + 600, "disconnected"))
    if i % 100 == 1:  # the same certificate under another client id, overlapping
        rows.append((fp, thing, "127.0.0.2:%d" % (1024 + i % 60000), at + 60, "mqtt", thing + "-clone", at + 300, "disconnected"))
    if i % 100 == 2:  # another device's certificate under this client id
        ofp, othing = certs[(i + 1) % n][1], certs[(i + 1) % n][2]
        rows.append((ofp, othing, "127.0.0.3:%d" % (1024 + i % 60000), at + 30, "mqtt", thing, at + 400, "disconnected"))
with db:
    db.executemany("INSERT INTO connections (fingerprint_sha256, thing_name, client_addr, at, transport, "
                   "client_id, disconnected_at, disconnect_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    soon = db.execute("UPDATE certificates SET not_after = ? WHERE rowid % 50 = 0", (now + 10 * 86400,)).rowcount
    past = db.execute("UPDATE certificates SET not_after = ? WHERE rowid % 200 = 7", (now - 86400,)).rowcount
print("%d certificates, %d MQTT session records, %d expiring within 30 days, %d past expiry"
      % (n, len(rows), soon, past), file=sys.stderr)
PY

for run in $(seq 1 "$runs"); do
    # Exit 1 is expected (the fleet is non-compliant); anything else is a failure.
    rc=0
    /usr/bin/time -f '%e %M' -o "$work/time-$run" "$bin" --output json audit run >"$work/audit-$run.json" || rc=$?
    [ "$rc" -le 1 ] || { echo "audit run failed (exit $rc)" >&2; cat "$work/audit-$run.json" >&2; exit 1; }
    python3 - "$work/audit-$run.json" "$work/time-$run" "$run" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
summary = report.get("summary", report)
# GNU time says "Command exited with non-zero status 1" first when the audit found something.
seconds, rss_kib = open(sys.argv[2]).read().split("\n")[-2].split()
print("run %s: `fleetcert audit run` %.2f s wall, peak RSS %.0f MiB, task %s %s"
      % (sys.argv[3], float(seconds), int(rss_kib) / 1024, summary["taskId"], summary["taskStatus"]))
if sys.argv[3] == "1":
    for d in summary["auditDetails"]:
        print("  %-58s %-24s %9s of %s" % (d["checkName"], d["checkRunStatus"],
              d.get("nonCompliantResourcesCount", "-"), d.get("totalResourcesCount", "-")))
PY
done
