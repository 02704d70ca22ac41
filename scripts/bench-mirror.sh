#!/usr/bin/env bash
# AWS IoT mirror benchmark against moto (a local fake of AWS IoT Core, started here):
#
#   scripts/bench-mirror.sh [DEVICES]        (default 1000)
#
# 1. throughput: DEVICES devices provisioned with the mirror enabled, then one
#    `fleetcert aws sync` applies the outbox (thing + certificate operations per device);
# 2. outage: moto is stopped, DEVICES more devices are provisioned (the outbox grows,
#    provisioning does not wait), a sync while AWS is down retries and keeps everything,
#    then moto comes back and `aws sync` drains the backlog: the drain time is printed.
# moto is single-threaded Python: the figures bound the client from below, they are not
# AWS's own rates (AWS IoT's control plane throttles near 10–100 requests/s per API).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
if [[ -z ${FLEETCERT_TEST_MOTO_BIN:-} ]]; then
    exec scripts/with-moto.sh "$0" "$@"
fi
# FLEETCERT_BIN: a fleetcert binary to use instead of building the release one.
if [[ -n ${FLEETCERT_BIN:-} ]]; then
    F=$FLEETCERT_BIN
else
    cargo build --release -q -p fleetcert
    F=$PWD/target/release/fleetcert
fi
WORK=$(mktemp -d)
MOTO_PID=
trap '[[ -n $MOTO_PID ]] && kill $MOTO_PID 2>/dev/null; rm -rf "$WORK"' EXIT
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start_moto() {
    "$FLEETCERT_TEST_MOTO_BIN" -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
    MOTO_PID=$!
    for _ in $(seq 150); do
        curl -sf -o /dev/null "http://127.0.0.1:$PORT/moto-api/data.json" && return 0
        sleep 0.2
    done
    echo "moto did not start" >&2
    exit 1
}
export FLEETCERT_DATA_DIR=$WORK/data
show() {
    python3 - "$@" <<'PY'
import json, sys
what, path = sys.argv[1], sys.argv[2]
d = json.load(open(path))
if what == "status":
    print(f"queued operations: {d['pending']}")
elif what == "down":
    print(f"aws sync while AWS is down: {d['retried']} retried, {d['parked']} parked, {d['pending_after']} pending after")
else:
    label = "aws sync" if what == "sync" else "backlog drain after the outage"
    print(f"{label}: {d['applied']} operations in {d['seconds']:.2f} s = {d['applied_per_second']:.0f} operations/s; {d['pending_after']} pending, {d['parked_after']} parked after")
PY
}
pallet() {
    { echo thing_name; for i in $(seq 1 "$N"); do echo "$1-$i"; done; } >"$WORK/$1.csv"
    "$F" provision --batch "$WORK/$1.csv" --out "$WORK/out-$1" >/dev/null 2>&1
}
start_moto
"$F" ca init >/dev/null 2>&1
"$F" aws enable --region eu-west-1 --endpoint-url "http://127.0.0.1:$PORT" >/dev/null
pallet first
echo "== throughput: $N devices provisioned with the mirror on" >&2
"$F" --output json aws status >"$WORK/status.json"; show status "$WORK/status.json"
"$F" --output json aws sync >"$WORK/sync1.json"; show sync "$WORK/sync1.json"

echo "== outage: moto stopped, $N more devices provisioned" >&2
kill "$MOTO_PID"; wait "$MOTO_PID" 2>/dev/null || true; MOTO_PID=
start=$(date +%s.%N)
pallet outage
end=$(date +%s.%N)
python3 -c "print(f'provisioning during the outage: $N devices in {$end-$start:.2f} s')"
"$F" --output json aws sync >"$WORK/down.json" || true
show down "$WORK/down.json"
start_moto
"$F" --output json aws sync >"$WORK/drain.json"; show drain "$WORK/drain.json"
