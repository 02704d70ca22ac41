#!/usr/bin/env bash
# Provisioning by claim, end to end: devices per second through mosquitto + the fleetcert
# plugin + `serve --broker-api`, with the AWS IoT Fleet Provisioning MQTT API.
#
#   usage: bench/claim-provisioning.sh [--quick] [--out FILE]
#
# 1. Release builds of fleetcert, fleetcert-bench and the plugin (libfleetcert_mosquitto.so).
# 2. A throwaway data directory: `ca init`, a Fleet Provisioning template (thing named from
#    the SerialNumber parameter, a least-privilege policy), `claims create`, `mosquitto
#    config`, `serve --broker-api` on loopback, mosquitto with the plugin.
# 3. `fleetcert-bench mqtt claim`, each device once: claim CONNECT + SUBSCRIBE →
#    CreateCertificateFromCsr → RegisterThing → reconnect with its new certificate and
#    client id = thing name (CONNACK 0). Then the same with CreateKeysAndCertificate.
#    Each run CLAIM_RUNS times (the spread is printed), CLAIM_DEVICES devices at
#    concurrency CLAIM_CONCURRENCY.
#    Then serve alone, without the broker: the same API calls the plugin makes
#    (`POST /broker/v1/provision`, batches of 64, 2 connections), CreateKeysAndCertificate.
# 4. Cross-checks: the registry holds exactly one thing per device provisioned; serve's
#    /metrics counts the provisioning requests.
# 5. A markdown report on stdout (and --out FILE); progress on stderr. KEEP_WORK=1 keeps
#    the temp dir; SUMMARY_JSON=FILE writes the figures.
#
# Sizes (environment): CLAIM_DEVICES (3000), CLAIM_CONCURRENCY (64), CLAIM_RUNS (3).
# --quick: 300 devices, one run.
#
# Needs mosquitto 2.0 (Debian `mosquitto`), curl and python3; downloads nothing.
# Everything listens on 127.0.0.1; every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2; }
note() { echo "claim-provisioning: $*" >&2; }

out=
quick=0
while [ $# -gt 0 ]; do
    case $1 in
    --quick) quick=1 ;;
    --out)
        [ $# -ge 2 ] || { note "--out needs a file name"; exit 2; }
        out=$2
        shift
        ;;
    -h | --help) usage; exit 0 ;;
    *) note "unknown argument '$1'"; usage; exit 2 ;;
    esac
    shift
done
if [ -n "$out" ] && ! touch "$out" 2>/dev/null; then
    note "cannot write --out $out"
    exit 2
fi
if [ "$quick" = 1 ]; then
    : "${CLAIM_DEVICES:=300}" "${CLAIM_RUNS:=1}"
fi
devices=${CLAIM_DEVICES:-3000}
concurrency=${CLAIM_CONCURRENCY:-64}
runs=${CLAIM_RUNS:-3}

for tool in mosquitto curl python3; do
    command -v "$tool" >/dev/null || { note "$tool is not installed (Debian: mosquitto, curl, python3)"; exit 1; }
done
mosquitto=$(command -v mosquitto)

note "building release binaries"
cargo build --release --quiet -p fleetcert -p fleetcert-bench -p fleetcert-mosquitto
fleetcert=$PWD/target/release/fleetcert
bench=$PWD/target/release/fleetcert-bench
plugin=$PWD/target/release/libfleetcert_mosquitto.so
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-claim-bench.XXXXXX")
serve_pid=
broker_pid=
cleanup() {
    local p
    for p in $broker_pid $serve_pid; do kill "$p" 2>/dev/null || true; done
    for p in $broker_pid $serve_pid; do wait "$p" 2>/dev/null || true; done
    if [ "${KEEP_WORK:-0}" = 1 ]; then note "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r port_tls port_admin port_api port_broker < <(free_ports 4)
data=$work/data
fc() { "$fleetcert" --data-dir "$data" "$@"; }
fc ca init >/dev/null
mkdir -p "$data/templates"
cp docs/examples/fleet-provisioning-template.yaml "$data/templates/sensors.yaml"
mkdir -p "$work/claim"
fc claims create factory-line --template sensors --out "$work/claim" >/dev/null
conf=$work/mosquitto
fc mosquitto config --listen "127.0.0.1:$port_broker" --broker-api "http://127.0.0.1:$port_api" \
    --out "$conf" --plugin "$plugin" >/dev/null
# mosquitto started as root switches to its own user unless told otherwise; the files are ours.
if [ "$(id -u)" = 0 ]; then echo "user root" >>"$conf/mosquitto.conf"; fi

"$fleetcert" --data-dir "$data" serve --listen "127.0.0.1:$port_tls" --admin-listen "127.0.0.1:$port_admin" \
    --broker-api "127.0.0.1:$port_api" --server-name localhost >"$work/serve.log" 2>&1 &
serve_pid=$!
wait_for_port "$port_api" "fleetcert serve" "$serve_pid"
"$mosquitto" -c "$conf/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
broker_pid=$!
wait_for_port "$port_broker" "mosquitto" "$broker_pid"

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
provisioned_total=0
for api in csr keys; do
    for run in $(seq 1 "$runs"); do
        note "$api run $run/$runs: $devices devices at concurrency $concurrency"
        "$bench" mqtt claim --broker "127.0.0.1:$port_broker" --ca "$conf/ca.pem" \
            --server-name localhost --claim-cert "$work/claim/factory-line.crt" \
            --claim-key "$work/claim/factory-line.key" --template sensors --api "$api" \
            --devices "$devices" --concurrency "$concurrency" --serial-prefix "$api$run-" \
            >"$work/$api-$run.json"
        ok=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["provisioned"])' "$work/$api-$run.json")
        provisioned_total=$((provisioned_total + ok))
    done
done
# serve alone, as the plugin asks it: POST /broker/v1/provision with batches of creates, then
# of RegisterThings, on 2 keep-alive connections (the plugin's 2 provisioning threads).
note "serve alone: $devices devices through POST /broker/v1/provision (batches of 64, 2 connections)"
python3 - "$conf/broker-api.secret" "$port_api" "$work/claim/factory-line.crt" "$devices" >"$work/serve-alone.json" <<'PY'
import base64, hashlib, http.client, json, re, sys, threading, time
secret_file, port, claim_pem, devices = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
secret = open(secret_file).read().strip()
pem = open(claim_pem).read()
der = base64.b64decode("".join(re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", pem, re.S).group(1).split()))
fingerprint = hashlib.sha256(der).hexdigest()
headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
b64 = lambda b: base64.b64encode(b).decode()
errors, done = [], [0]
lock = threading.Lock()
def post(conn, requests):
    conn.request("POST", "/broker/v1/provision", json.dumps({"requests": requests}), headers)
    r = conn.getresponse(); body = r.read()
    if r.status != 200: raise RuntimeError(f"{r.status} {body[:200]!r}")
    return json.loads(body)["replies"]
def worker(first, count):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for start in range(first, first + count, 64):
        ids = range(start, min(start + 64, first + count))
        sessions = {i: f"alone-{i}" for i in ids}
        created = post(conn, [{"id": i, "session": sessions[i], "fingerprint_sha256": fingerprint,
                               "topic": "$aws/certificates/create/json", "payload_b64": b64(b"{}")} for i in ids])
        tokens = {}
        for reply in created:
            payload = json.loads(base64.b64decode(reply["payload_b64"]))
            if reply["topic"].endswith("/accepted"): tokens[reply["id"]] = payload["certificateOwnershipToken"]
            else: errors.append(payload)
        registered = post(conn, [{"id": i, "session": sessions[i], "fingerprint_sha256": fingerprint,
                                  "topic": "$aws/provisioning-templates/sensors/provision/json",
                                  "payload_b64": b64(json.dumps({"certificateOwnershipToken": t,
                                                                 "parameters": {"SerialNumber": f"alone-{i:07d}"}}).encode())}
                                 for i, t in tokens.items()])
        for reply in registered:
            if reply["topic"].endswith("/accepted"):
                with lock: done[0] += 1
            else: errors.append(json.loads(base64.b64decode(reply["payload_b64"])))
half = devices // 2
started = time.perf_counter()
threads = [threading.Thread(target=worker, args=(0, half)), threading.Thread(target=worker, args=(half, devices - half))]
for t in threads: t.start()
for t in threads: t.join()
seconds = time.perf_counter() - started
print(json.dumps({"devices": devices, "provisioned": done[0], "errors": len(errors), "error_samples": errors[:3],
                  "seconds": seconds, "devices_per_second": done[0] / seconds}))
PY
alone=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["provisioned"])' "$work/serve-alone.json")
provisioned_total=$((provisioned_total + alone))

things=$(fc --output json things list | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
curl -fsS "http://127.0.0.1:$port_admin/metrics" >"$work/metrics.txt" || echo >"$work/metrics.txt"

python3 - "$work" "$runs" "$things" "$provisioned_total" "$started" "$devices" "$concurrency" <<'PY' | tee ${out:+"$out"}
import json, os, platform, re, sys
work, runs, things, provisioned, started, devices, concurrency = sys.argv[1:8]
runs = int(runs)
def load(api, r): return json.load(open(os.path.join(work, f"{api}-{r}.json")))
print(f"### Provisioning by claim, end to end ({started})\n")
print(f"{devices} devices per run, concurrency {concurrency}, {os.cpu_count()} CPUs, "
      f"mosquitto + plugin + `serve --broker-api` (SQLite) on one machine with the generator.\n")
print("| API | run | devices/s | failed | p50 ms | p99 ms | claim connect p50 | create p50 | RegisterThing p50 | reconnect p50 |")
print("|---|---|---|---|---|---|---|---|---|---|")
summary = {}
for api, label in (("csr", "CreateCertificateFromCsr"), ("keys", "CreateKeysAndCertificate")):
    rates = []
    for r in range(1, runs + 1):
        j = load(api, r)
        s = j["steps_ms"]
        rates.append(j["devices_per_second"])
        print(f"| {label} | {r} | {j['devices_per_second']:.0f} | {j['failed']} | {j['latency_ms']['p50']:.1f} | "
              f"{j['latency_ms']['p99']:.1f} | {s['1_claim_connect']['p50']:.1f} | {s['2_create']['p50']:.1f} | "
              f"{s['3_register_thing']['p50']:.1f} | {s['4_reconnect']['p50']:.1f} |")
        if j["failed"]:
            print(f"|  | errors | {j['errors']} {j['rejected_codes']} {j['error_samples'][:2]} |||||||")
    summary[api] = {"devices_per_second": rates, "min": min(rates), "max": max(rates)}
    print(f"| {label} | spread | {min(rates):.0f}–{max(rates):.0f} |||||||| |")
alone = json.load(open(os.path.join(work, "serve-alone.json")))
print(f"\nserve alone (no broker, no TLS: `POST /broker/v1/provision` as the plugin sends it, batches of 64 "
      f"creates then 64 RegisterThings on 2 connections, CreateKeysAndCertificate): "
      f"{alone['devices_per_second']:.0f} devices/s, {alone['provisioned']}/{alone['devices']} provisioned, {alone['errors']} errors.")
summary["serve_alone"] = alone["devices_per_second"]
metrics = open(os.path.join(work, "metrics.txt")).read()
lines = [l for l in metrics.splitlines() if "provision" in l and not l.startswith("#")]
print(f"\nRegistry after the runs: {things} things; the generator counted {provisioned} devices provisioned.")
if lines:
    print("serve /metrics: " + "; ".join(lines[:6]))
summary.update({"things": int(things), "provisioned": int(provisioned)})
if os.environ.get("SUMMARY_JSON"):
    json.dump(summary, open(os.environ["SUMMARY_JSON"], "w"), indent=2)
PY
if [ "$things" != "$provisioned_total" ]; then
    note "the registry holds $things things but $provisioned_total devices were provisioned"
    exit 1
fi
