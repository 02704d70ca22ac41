#!/usr/bin/env bash
# MQTT: mosquitto with the fleetcert plugin against mosquitto alone (the ceiling), one run.
#
#   usage: bench/mqtt-compare.sh [--quick] [--out FILE]
#
# 1. Release builds of fleetcert, fleetcert-bench and the plugin (libfleetcert_mosquitto.so).
# 2. A throwaway data directory: `ca init`, `provision --batch` of the device sets below,
#    `mosquitto config` (the plugin broker's files), `serve --broker-api` on loopback.
# 3. Two mosquitto processes on loopback ports, same TLS files (server certificate, fleet
#    CA, CRL, TLS 1.2 minimum): "plugin" is the configuration `fleetcert mosquitto config`
#    writes; "ceiling" has no plugin, `require_certificate true` and
#    `use_identity_as_username true` (certificate-authenticated clients are let in with
#    `allow_anonymous false`; checked below with mosquitto_pub, with and without a
#    certificate), and no ACL — the most mosquitto alone can do with these certificates.
# 4. The same scenarios against both, interleaved (ceiling, then plugin) so drift on a
#    shared machine hits both alike, with `fleetcert-bench mqtt`:
#    - CONNECT of new devices (each once; JITP registration behind the plugin), peak;
#    - CONNECT of returning devices: once each after a broker restart (plugin cache empty:
#      serve is asked, no registration), then round-robin (answered from the plugin's
#      cache), peak; then paced at half of each broker's own peak (p99);
#    - CONNECT of new devices paced at half the plugin's new-device peak (p99);
#    - QoS 1 publish, closed loop (peak PUBACKs/s); open loop at MQTT_PUBLISH_CPU_RATE with
#      each broker's CPU time per message read from /proc (its capacity when it, not the
#      generator, is the limit); then open loop at MQTT_PUBLISH_RATE
#      without and with new devices onboarding at MQTT_ONBOARD_RATE per second (p99);
#    - 1,000 sessions held open after a restart of both brokers: VmRSS of each mosquitto.
#    The plugin broker is restarted between phases (its CONNECT cache starts empty) and its
#    log of each phase is kept: the plugin logs every CONNECT it lets in, from serve or
#    from its cache, so the report counts which path each phase took. serve's /metrics
#    counts broker connects (registered / allowed) as a cross-check.
#    The synchronous call itself is timed alone too: `POST /broker/v1/connect` to serve,
#    one at a time on one keep-alive connection as the plugin makes it, for MQTT_API_DEVICES
#    new certificates (registration) and then the same again (returning: lookup only).
# 5. A markdown report on stdout (and --out FILE); progress on stderr. KEEP_WORK=1 keeps
#    the temp dir (every generator JSON, broker logs); SUMMARY_JSON=FILE writes the figures.
#
# Sizes (environment): MQTT_DEVICES (3000: registered by the first-connect run, reused by
# the returning, publish and hold runs), MQTT_NEW_HALF_DEVICES (3000), MQTT_SECONDS (10),
# MQTT_CONCURRENCY (32), MQTT_PUBLISH_DEVICES (100), MQTT_PUBLISH_WINDOW (8 per session),
# MQTT_PUBLISH_RATE (2000 messages/s in all), MQTT_PUBLISH_CPU_RATE (20000/s), MQTT_ONBOARD_RATE (100/s), MQTT_HOLD_DEVICES
# (1000), MQTT_HOLD_SECONDS (10), MQTT_API_DEVICES (500). MQTT_NODELAY=1 adds
# `set_tcp_nodelay true` to BOTH brokers' configurations (`fleetcert mosquitto config` does
# not write it; without it, mosquitto's CONNACK waits on the client's delayed ACK, ~40 ms).
# --quick: small sizes, a smoke run.
#
# Needs mosquitto 2.0 and mosquitto_pub (Debian `mosquitto`, `mosquitto-clients`), curl and
# python3; downloads nothing. Everything listens on 127.0.0.1; every process it starts is
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; }
note() { echo "mqtt-compare: $*" >&2; }

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
    : "${MQTT_DEVICES:=1000}" "${MQTT_NEW_HALF_DEVICES:=400}" "${MQTT_SECONDS:=3}"
    : "${MQTT_PUBLISH_DEVICES:=20}" "${MQTT_PUBLISH_RATE:=500}" "${MQTT_PUBLISH_CPU_RATE:=5000}" "${MQTT_HOLD_DEVICES:=200}" "${MQTT_HOLD_SECONDS:=2}"
    : "${MQTT_API_DEVICES:=100}"
fi
devices=${MQTT_DEVICES:-3000}
new_half_devices=${MQTT_NEW_HALF_DEVICES:-3000}
seconds=${MQTT_SECONDS:-10}
concurrency=${MQTT_CONCURRENCY:-32}
pub_devices=${MQTT_PUBLISH_DEVICES:-100}
pub_window=${MQTT_PUBLISH_WINDOW:-8}
pub_rate=${MQTT_PUBLISH_RATE:-2000}
pub_cpu_rate=${MQTT_PUBLISH_CPU_RATE:-20000}
onboard_rate=${MQTT_ONBOARD_RATE:-100}
hold_devices=${MQTT_HOLD_DEVICES:-1000}
hold_seconds=${MQTT_HOLD_SECONDS:-10}
api_devices=${MQTT_API_DEVICES:-500}
nodelay=${MQTT_NODELAY:-0}
if [ "$hold_devices" -gt "$devices" ] || [ "$pub_devices" -gt "$devices" ]; then
    note "MQTT_DEVICES ($devices) must be at least MQTT_HOLD_DEVICES and MQTT_PUBLISH_DEVICES"
    exit 2
fi

for tool in mosquitto mosquitto_pub curl python3; do
    command -v "$tool" >/dev/null || { note "$tool is not installed (Debian: mosquitto, mosquitto-clients, curl, python3)"; exit 1; }
done
mosquitto=$(command -v mosquitto)

note "building release binaries"
cargo build --release --quiet -p fleetcert -p fleetcert-bench -p fleetcert-mosquitto
fleetcert=$PWD/target/release/fleetcert
bench=$PWD/target/release/fleetcert-bench
plugin=$PWD/target/release/libfleetcert_mosquitto.so

# Each held session is a file descriptor in the broker and in the generator.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-mqtt-compare.XXXXXX")
pids=()
plugin_pid=
ceiling_pid=
cleanup() {
    local p
    for p in "${pids[@]}" $plugin_pid $ceiling_pid; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}" $plugin_pid $ceiling_pid; do
        wait "$p" 2>/dev/null || true
    done
    if [ "${KEEP_WORK:-0}" = 1 ]; then note "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r port_tls port_admin port_api port_plugin port_ceiling < <(free_ports 5)

# --- fleetcert: CA, devices, broker configuration, serve ------------------------------
data=$work/data
onboard_devices=$(python3 -c "import math,sys; print(math.ceil(float(sys.argv[1]) * float(sys.argv[2]) * 1.2) + 20)" "$onboard_rate" "$seconds")
note "provisioning $devices + $new_half_devices + $onboard_devices devices in $work"
"$fleetcert" --data-dir "$data" ca init >/dev/null
provision() { # DIR PREFIX COUNT
    { echo thing_name; seq -f "$2-%07g" 1 "$3"; } >"$work/$2.csv"
    "$fleetcert" --data-dir "$data" --output json provision --batch "$work/$2.csv" \
        --out "$1" 2>/dev/null | tail -n 1 >"$work/provision-$2.json"
}
provision "$work/devices" mqtt-dev "$devices"
provision "$work/new-half" mqtt-new "$new_half_devices"
provision "$work/onboard" mqtt-onb "$onboard_devices"
provision "$work/check" mqtt-chk 1
provision "$work/api" mqtt-api "$api_devices"

conf=$work/mosquitto
"$fleetcert" --data-dir "$data" mosquitto config --listen "127.0.0.1:$port_plugin" \
    --broker-api "http://127.0.0.1:$port_api" --out "$conf" --plugin "$plugin" >/dev/null
# mosquitto started as root switches to its own user unless told otherwise; the files are ours.
if [ "$(id -u)" = 0 ]; then echo "user root" >>"$conf/mosquitto.conf"; fi
cat >"$work/ceiling.conf" <<EOF
# The ceiling: mosquitto alone with the same TLS files, no plugin, no ACL.
per_listener_settings false
allow_anonymous false
listener $port_ceiling 127.0.0.1
cafile $conf/ca.pem
certfile $conf/server.crt
keyfile $conf/server.key
crlfile $conf/crl.pem
require_certificate true
use_identity_as_username true
tls_version tlsv1.2
EOF
if [ "$(id -u)" = 0 ]; then echo "user root" >>"$work/ceiling.conf"; fi
if [ "$nodelay" = 1 ]; then
    for f in "$conf/mosquitto.conf" "$work/ceiling.conf"; do
        printf '# Added by bench/mqtt-compare.sh (MQTT_NODELAY=1).\nset_tcp_nodelay true\n' >>"$f"
    done
fi

"$fleetcert" --data-dir "$data" serve --listen "127.0.0.1:$port_tls" \
    --admin-listen "127.0.0.1:$port_admin" --broker-api "127.0.0.1:$port_api" \
    --server-name localhost >"$work/serve.log" 2>&1 &
serve_pid=$!
pids+=("$serve_pid")
wait_for_port "$port_api" "fleetcert serve" "$serve_pid"

# --- the brokers ------------------------------------------------------------------------
plugin_starts=0
ceiling_starts=0
start_plugin() {
    plugin_starts=$((plugin_starts + 1))
    "$mosquitto" -c "$conf/mosquitto.conf" >"$work/plugin-$plugin_starts.log" 2>&1 &
    plugin_pid=$!
    wait_for_port "$port_plugin" "mosquitto (plugin)" "$plugin_pid"
}
start_ceiling() {
    ceiling_starts=$((ceiling_starts + 1))
    "$mosquitto" -c "$work/ceiling.conf" >"$work/ceiling-$ceiling_starts.log" 2>&1 &
    ceiling_pid=$!
    wait_for_port "$port_ceiling" "mosquitto (ceiling)" "$ceiling_pid"
}
stop_plugin() { # PHASE: the plugin's counters line (logged at stop) is filed under it
    kill "$plugin_pid" 2>/dev/null || true
    wait "$plugin_pid" 2>/dev/null || true
    plugin_pid=
    cp "$work/plugin-$plugin_starts.log" "$work/plugin-phase-$1.log"
}
stop_ceiling() {
    kill "$ceiling_pid" 2>/dev/null || true
    wait "$ceiling_pid" 2>/dev/null || true
    ceiling_pid=
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
start_plugin
start_ceiling

# Both brokers let a fleet certificate in and refuse a client without one.
check_broker() { # NAME PORT
    local name=$1 port=$2
    if ! timeout 20 mosquitto_pub -h 127.0.0.1 -p "$port" -V mqttv311 -q 1 --cafile "$conf/ca.pem" \
        --cert "$work/check/mqtt-chk-0000001.crt" --key "$work/check/mqtt-chk-0000001.key" \
        -i mqtt-chk-0000001 -t devices/mqtt-chk-0000001/telemetry -m check >"$work/check-$name.log" 2>&1; then
        note "$name broker refused a fleet certificate:"; cat "$work/check-$name.log" >&2; exit 1
    fi
    if timeout 20 mosquitto_pub -h 127.0.0.1 -p "$port" -V mqttv311 -q 1 --cafile "$conf/ca.pem" \
        -i mqtt-chk-0000001 -t devices/mqtt-chk-0000001/telemetry -m check >>"$work/check-$name.log" 2>&1; then
        note "$name broker accepted a client without a certificate"; exit 1
    fi
}
check_broker ceiling "$port_ceiling"
check_broker plugin "$port_plugin"
note "both brokers accept a fleet certificate and refuse a client without one"

# --- the scenarios ----------------------------------------------------------------------
c_broker=127.0.0.1:$port_ceiling
p_broker=127.0.0.1:$port_plugin
mqtt() { # OUTPUT.json MODE BROKER [options...]
    local out=$1 mode=$2 broker=$3
    shift 3
    "$bench" mqtt "$mode" --broker "$broker" --ca "$conf/ca.pem" --server-name localhost "$@" >"$work/$out.json"
}
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$work/$1.json" "$2"; }
half() { python3 -c 'import sys; print(round(float(sys.argv[1]) / 2, 1))' "$1"; }
scrape() { curl -fsS "http://127.0.0.1:$port_admin/metrics" >"$work/metrics-$1.txt" || echo >"$work/metrics-$1.txt"; }

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
scrape 0
note "1/6 new devices, each once ($devices devices, concurrency $concurrency)"
mqtt c-new connect "$c_broker" --certs "$work/devices" --new-devices --duration "$seconds" --concurrency "$concurrency"
mqtt p-new connect "$p_broker" --certs "$work/devices" --new-devices --duration 600 --concurrency "$concurrency"
scrape 1
stop_plugin new
start_plugin

note "1b/6 the synchronous call alone: POST /broker/v1/connect, $api_devices new certificates, then the same again"
python3 - "$work/api" "$conf/broker-api.secret" "$port_api" >"$work/api-timing.json" <<'PY'
import http.client, json, os, sys, time
certs, secret_file, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
secret = open(secret_file).read().strip()
names = sorted(f[:-4] for f in os.listdir(certs) if f.endswith(".crt"))
pems = {n: open(os.path.join(certs, n + ".crt")).read() for n in names}
conn = http.client.HTTPConnection("127.0.0.1", port)
headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
def run():
    times, registered, bad = [], 0, []
    for n in names:
        body = json.dumps({"client_id": n, "certificate_pem": pems[n], "source_address": "127.0.0.1", "username": None})
        t = time.perf_counter()
        conn.request("POST", "/broker/v1/connect", body, headers)
        r = conn.getresponse()
        answer = r.read()
        times.append(time.perf_counter() - t)
        if r.status != 200 or json.loads(answer).get("result") != "allowed":
            bad.append(f"{n}: {r.status} {answer[:200]!r}")
        elif json.loads(answer).get("registered"):
            registered += 1
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3
    return {"calls": len(times), "registered": registered, "errors": len(bad), "error_samples": bad[:3],
            "mean_ms": sum(times) / len(times) * 1e3, "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": times[-1] * 1e3}
print(json.dumps({"new": run(), "returning": run()}))
PY

note "2/6 returning devices: once each with the plugin's cache empty, then round-robin (${seconds}s)"
# The ceiling first: the plugin's round-robin run must follow its cache-warming pass at once
# (cache entries live cache_seconds, 30 s, from serve's answer).
mqtt c-returning connect "$c_broker" --certs "$work/devices" --duration "$seconds" --concurrency "$concurrency"
mqtt p-uncached connect "$p_broker" --certs "$work/devices" --new-devices --duration 600 --concurrency "$concurrency"
mqtt p-returning connect "$p_broker" --certs "$work/devices" --duration "$seconds" --concurrency "$concurrency"
scrape 2
stop_plugin returning
start_plugin

c_half=$(half "$(field c-returning connects_per_second)")
p_half=$(half "$(field p-returning connects_per_second)")
note "3/6 returning at half of each peak (ceiling $c_half/s, plugin $p_half/s; the plugin's cache warmed first)"
mqtt c-returning-half connect "$c_broker" --certs "$work/devices" --duration "$seconds" --rate "$c_half" --concurrency "$concurrency"
mqtt p-uncached-2 connect "$p_broker" --certs "$work/devices" --new-devices --duration 600 --concurrency "$concurrency"
mqtt p-returning-half connect "$p_broker" --certs "$work/devices" --duration "$seconds" --rate "$p_half" --concurrency "$concurrency"
scrape 3
stop_plugin returning-half
start_plugin

p_new_half=$(half "$(field p-new connects_per_second)")
note "4/6 new devices at half the plugin's new-device peak ($p_new_half/s, ${seconds}s)"
mqtt p-new-half connect "$p_broker" --certs "$work/new-half" --new-devices --duration "$seconds" --rate "$p_new_half" --concurrency "$concurrency"
scrape 4
stop_plugin new-half
start_plugin

note "5/6 QoS 1 publish: $pub_devices sessions, window $pub_window (peak); $pub_cpu_rate/s (broker CPU per message); $pub_rate/s without and with $onboard_rate/s onboarding"
pub_common=(--devices "$pub_devices" --duration "$seconds" --warmup 2)
mqtt c-publish publish "$c_broker" --certs "$work/devices" "${pub_common[@]}" --window "$pub_window" --broker-pid "$ceiling_pid"
mqtt p-publish publish "$p_broker" --certs "$work/devices" "${pub_common[@]}" --window "$pub_window" --broker-pid "$plugin_pid"
# The same messages at the same rate to both: the broker's CPU time per message is its
# cost whoever limits the closed loop (on 2 shared cores, often the generator).
mqtt c-publish-cpu publish "$c_broker" --certs "$work/devices" "${pub_common[@]}" --rate "$pub_cpu_rate" --broker-pid "$ceiling_pid"
mqtt p-publish-cpu publish "$p_broker" --certs "$work/devices" "${pub_common[@]}" --rate "$pub_cpu_rate" --broker-pid "$plugin_pid"
mqtt c-publish-rate publish "$c_broker" --certs "$work/devices" "${pub_common[@]}" --rate "$pub_rate"
mqtt p-publish-rate publish "$p_broker" --certs "$work/devices" "${pub_common[@]}" --rate "$pub_rate"
mqtt c-publish-onboard publish "$c_broker" --certs "$work/devices" "${pub_common[@]}" --rate "$pub_rate" \
    --onboard-certs "$work/onboard" --onboard-rate "$onboard_rate"
mqtt p-publish-onboard publish "$p_broker" --certs "$work/devices" "${pub_common[@]}" --rate "$pub_rate" \
    --onboard-certs "$work/onboard" --onboard-rate "$onboard_rate"
scrape 5
stop_plugin publish
stop_ceiling

note "6/6 memory: $hold_devices sessions held ${hold_seconds}s, each broker freshly started"
hold_rss() { # NAME BROKER_PID BROKER: writes NAME-hold.json and NAME-rss.json
    local name=$1 bpid=$2 broker=$3 idle
    sleep 1
    idle=$(rss_kib "$bpid")
    rm -f "$work/$name-ready"
    "$bench" mqtt hold --broker "$broker" --ca "$conf/ca.pem" --server-name localhost \
        --certs "$work/devices" --devices "$hold_devices" --seconds "$hold_seconds" \
        --ready-file "$work/$name-ready" >"$work/$name-hold.json" &
    local hpid=$! held=0 peak=0 now
    pids+=("$hpid")
    while kill -0 "$hpid" 2>/dev/null; do
        now=$(rss_kib "$bpid")
        [ "$now" -gt "$peak" ] && peak=$now
        if [ "$held" = 0 ] && [ -e "$work/$name-ready" ]; then
            sleep 2
            held=$(rss_kib "$bpid")
        fi
        sleep 0.2
    done
    wait "$hpid"
    local hwm
    hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$bpid/status" 2>/dev/null || echo 0)
    printf '{"idle_kib": %s, "held_kib": %s, "peak_sampled_kib": %s, "hwm_kib": %s}\n' \
        "$idle" "$held" "$peak" "$hwm" >"$work/$name-rss.json"
}
start_ceiling
hold_rss ceiling "$ceiling_pid" "$c_broker"
stop_ceiling
start_plugin
hold_rss plugin "$plugin_pid" "$p_broker"
scrape 6
stop_plugin hold

revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then revision+=" (with uncommitted changes)"; fi
mosquitto_version=$({ "$mosquitto" -h 2>&1 || true; } | head -n 1)

# --- report -----------------------------------------------------------------------------
python3 - "$work" "$started" "$revision" "$quick" "$mosquitto_version" \
    "$devices" "$seconds" "$concurrency" "$pub_devices" "$pub_window" "$pub_rate" "$onboard_rate" \
    "$hold_devices" "$nodelay" "$pub_cpu_rate" <<'EOF' | tee ${out:+"$out"}
import json, os, platform, re, sys
(work, started, revision, quick, mosquitto_version, devices, seconds, concurrency,
 pub_devices, pub_window, pub_rate, onboard_rate, hold_devices, nodelay, pub_cpu_rate) = sys.argv[1:]
load = lambda name: json.load(open(os.path.join(work, name + ".json")))
api = load("api-timing")
R = {n: load(n) for n in ["c-new", "p-new", "p-uncached", "p-uncached-2", "c-returning", "p-returning",
                          "c-returning-half", "p-returning-half", "p-new-half", "c-publish", "p-publish",
                          "c-publish-cpu", "p-publish-cpu", "c-publish-rate", "p-publish-rate", "c-publish-onboard", "p-publish-onboard",
                          "ceiling-hold", "plugin-hold", "ceiling-rss", "plugin-rss"]}

def plugin_counters(phase):
    path = os.path.join(work, f"plugin-phase-{phase}.log")
    if not os.path.exists(path):
        return None
    counts = {"from_serve": 0, "from_cache": 0, "refused": 0}
    for line in open(path, errors="replace"):
        if "fleetcert: CONNECT" not in line:
            continue
        if "allowed from the cache" in line:
            counts["from_cache"] += 1
        elif ") allowed: " in line or " allowed: thing" in line:
            counts["from_serve"] += 1
        elif "refused" in line:
            counts["refused"] += 1
    return counts
phases = {p: plugin_counters(p) for p in ["new", "returning", "returning-half", "new-half", "publish", "hold"]}

def counter(n, endpoint):
    path = os.path.join(work, f"metrics-{n}.txt")
    total = 0
    for line in open(path):
        if line.startswith("fleetcert_device_requests_total{") and f'endpoint="{endpoint}"' in line:
            total += float(line.split()[-1])
    return int(total)
serve_counts = {
    f"scrape{n}": {e: counter(n, e) for e in ["broker_connect_registered", "broker_connect_allowed", "broker_connect_refused"]}
    for n in range(7)}
registered_by_new = serve_counts["scrape1"]["broker_connect_registered"] - serve_counts["scrape0"]["broker_connect_registered"]

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
load_avg = open("/proc/loadavg").read().split()[:3]
print(f"# MQTT: mosquitto with the fleetcert plugin against mosquitto alone — {started}")
print()
if quick == "1":
    print("**Quick smoke run (`--quick`): sizes too small for the figures to mean anything.**")
    print()
print(f"fleetcert {revision}; {mosquitto_version}; {cpu}, {os.cpu_count()} cores, "
      f"{platform.system()} {platform.release()}; load average at the end {' '.join(load_avg)}. "
      "Generator, serve and both brokers share the cores; everything on 127.0.0.1; MQTT 3.1.1 over "
      "TLS with a device certificate, a new TCP connection and full handshake per CONNECT.")
print()
met = lambda ok: "met" if ok else "**not met**"
cps = lambda r: r["connects_per_second"]
lat = lambda r: r["latency_ms"]
ratio = lambda a, b: a / b if b else 0.0
goals = []
g_ret = ratio(cps(R["p-returning"]), cps(R["c-returning"]))
g_unc = ratio(cps(R["p-uncached"]), cps(R["c-returning"]))
g_new = ratio(cps(R["p-new"]), cps(R["c-new"]))
g_pub = ratio(R["p-publish"]["acks_per_second"], R["c-publish"]["acks_per_second"])
cpu_msg = lambda r: r["broker_cpu_us_per_message"] or 0.0
# Messages per second of broker CPU: the throughput when the broker is the limit.
g_pub_cpu = ratio(cpu_msg(R["c-publish-cpu"]), cpu_msg(R["p-publish-cpu"]))
p99_base = R["p-publish-rate"]["latency_ms"]["p99"]
p99_onb = R["p-publish-onboard"]["latency_ms"]["p99"]
g_onb = ratio(p99_onb, p99_base)
p99_half = lat(R["p-returning-half"])["p99"]
p99_new_half = lat(R["p-new-half"])["p99"]
# mosquitto's one thread spends, per new device, the ceiling's cost of a connect plus the
# synchronous call to serve (timed alone, one at a time, as the plugin makes it).
bound = 1 / (1 / cps(R["c-new"]) + api["new"]["mean_ms"] / 1e3)
bound_uncached = 1 / (1 / cps(R["c-returning"]) + api["returning"]["mean_ms"] / 1e3)
rows = [
    ("returning-device CONNECT (plugin cache hit)", f'{cps(R["p-returning"]):,.0f}/s', f'{cps(R["c-returning"]):,.0f}/s', f"{g_ret:.2f}×", "≥ 0.9×", met(g_ret >= 0.9)),
    ("&nbsp;&nbsp;returning, plugin cache empty (serve asked, no registration)", f'{cps(R["p-uncached"]):,.0f}/s', f'{cps(R["c-returning"]):,.0f}/s', f"{g_unc:.2f}×", "(≥ 0.9×)", met(g_unc >= 0.9)),
    ("new-device CONNECT (JITP, durable registration)", f'{cps(R["p-new"]):,.0f}/s', f'{cps(R["c-new"]):,.0f}/s', f"{g_new:.2f}×", "≥ 0.5×", met(g_new >= 0.5)),
    ("QoS 1 publish throughput with enforcement (closed loop)", f'{R["p-publish"]["acks_per_second"]:,.0f}/s', f'{R["c-publish"]["acks_per_second"]:,.0f}/s', f"{g_pub:.2f}×", "≥ 0.9×", met(g_pub >= 0.9)),
    (f'&nbsp;&nbsp;broker capacity: CPU per message at {float(pub_cpu_rate):,.0f} msg/s (ratio = messages per broker CPU-second)',
     f'{cpu_msg(R["p-publish-cpu"]):.2f} µs', f'{cpu_msg(R["c-publish-cpu"]):.2f} µs', f"{g_pub_cpu:.2f}×", "≥ 0.9×", met(g_pub_cpu >= 0.9)),
    (f"p99 publish latency at {float(pub_rate):,.0f} msg/s, with / without {float(onboard_rate):,.0f}/s onboarding",
     f"{p99_onb:.2f} / {p99_base:.2f} ms", f'{R["c-publish-onboard"]["latency_ms"]["p99"]:.2f} / {R["c-publish-rate"]["latency_ms"]["p99"]:.2f} ms',
     f"{g_onb:.2f}×", "≤ 2×", met(g_onb <= 2)),
    (f'p99 returning CONNECT at half of peak ({R["p-returning-half"]["rate"]:,.0f}/s)', f"{p99_half:.1f} ms",
     f'{lat(R["c-returning-half"])["p99"]:.1f} ms at {R["c-returning-half"]["rate"]:,.0f}/s', "—", "< 25 ms", met(p99_half < 25)),
    (f'p99 new-device CONNECT at half of its peak ({R["p-new-half"]["rate"]:,.0f}/s)', f"{p99_new_half:.1f} ms", "—", "—", "(< 25 ms)", met(p99_new_half < 25)),
    (f"mosquitto RSS with {int(hold_devices):,} devices connected",
     f'{R["plugin-rss"]["held_kib"] / 1024:.1f} MiB', f'{R["ceiling-rss"]["held_kib"] / 1024:.1f} MiB',
     f'{ratio(R["plugin-rss"]["held_kib"], R["ceiling-rss"]["held_kib"]):.2f}×', "reported", "—"),
]
print("| goal | plugin | ceiling (mosquitto alone) | ratio | goal | |")
print("|---|---:|---:|---:|---:|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
a_new, a_ret = api["new"], api["returning"]
print(f"The synchronous call, timed alone (`POST /broker/v1/connect`, one at a time on one keep-alive "
      f"connection, Python client): first use of a certificate (registration, durable) mean {a_new['mean_ms']:.2f} ms, "
      f"p50 {a_new['p50_ms']:.2f}, p99 {a_new['p99_ms']:.2f}, max {a_new['max_ms']:.1f} ms ({a_new['registered']:,} of "
      f"{a_new['calls']:,} registered); returning certificate (lookup) mean {a_ret['mean_ms']:.2f} ms, p50 {a_ret['p50_ms']:.2f}, "
      f"p99 {a_ret['p99_ms']:.2f} ms.")
print()
print(f"Bound on new-device CONNECTs: mosquitto's one thread spends per new device the ceiling's connect cost "
      f"(1/{cps(R['c-new']):,.0f} s = {1e3 / cps(R['c-new']):.2f} ms) plus the synchronous call ({a_new['mean_ms']:.2f} ms): "
      f"at most ≈ {bound:,.0f}/s = {ratio(bound, cps(R['c-new'])):.2f}× the ceiling; measured {cps(R['p-new']):,.0f}/s "
      f"= {ratio(cps(R['p-new']), bound):.2f}× that bound. Same for a returning device the plugin has not cached: "
      f"≈ {bound_uncached:,.0f}/s, measured {cps(R['p-uncached']):,.0f}/s.")
print()
print(f"Both brokers {'with `set_tcp_nodelay true` (MQTT_NODELAY=1)' if nodelay == '1' else 'as configured (no `set_tcp_nodelay`: mosquitto default)'}. "
      f"{int(devices):,} devices registered by the first-connect run; concurrency {concurrency}; {seconds} s timed runs; "
      f"publish: {pub_devices} sessions, 64-byte payloads, topic devices/<name>/telemetry.")
print()
print("| run | broker | rate asked | ok | errors | per second | p50 ms | p90 ms | p99 ms | max ms |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
def errs(r, key="errors"):
    e = {k: v for k, v in r[key].items() if v}
    return "0" if not e else f"{sum(e.values())} {e}"
def crow(label, name, broker):
    r = R[name]
    l = r["latency_ms"]
    rate = "—" if r["rate"] is None else f'{r["rate"]:,.0f}/s'
    print(f'| {label} | {broker} | {rate} | {r["ok"]:,} | {errs(r)} | {r["connects_per_second"]:,.0f} | '
          f'{l["p50"]:.1f} | {l["p90"]:.1f} | {l["p99"]:.1f} | {l["max"]:.1f} |')
crow("CONNECT, new devices (each once)", "c-new", "ceiling")
crow("CONNECT, new devices (each once)", "p-new", "plugin")
crow("CONNECT, returning, plugin cache empty (each once)", "p-uncached", "plugin")
crow("same, again (before the half-load run)", "p-uncached-2", "plugin")
crow("CONNECT, returning (round-robin)", "c-returning", "ceiling")
crow("CONNECT, returning (round-robin, plugin cache; see the log counts below)", "p-returning", "plugin")
crow("CONNECT, returning at half of peak", "c-returning-half", "ceiling")
crow("CONNECT, returning at half of peak", "p-returning-half", "plugin")
crow("CONNECT, new devices at half of the new-device peak", "p-new-half", "plugin")
def prow(label, name, broker):
    r = R[name]
    l = r["latency_ms"]
    rate = f'window {r["window"]}' if r["window"] else f'{r["rate"]:,.0f}/s'
    bad = r["lost_sessions"] + r["unacked_at_end"] + sum(r["connect_errors"].values())
    print(f'| {label} | {broker} | {rate} | {r["acked"]:,} of {r["published"]:,} | {bad} | {r["acks_per_second"]:,.0f} | '
          f'{l["p50"]:.2f} | {l["p90"]:.2f} | {l["p99"]:.2f} | {l["max"]:.1f} |')
    if r.get("onboarding"):
        o = r["onboarding"]
        ol = o["latency_ms"]
        print(f'| &nbsp;&nbsp;new devices connecting meanwhile | {broker} | {o["rate"]:,.0f}/s | {o["ok"]:,} | {errs(o)} | '
              f'{o["connects_per_second"]:,.0f} | {ol["p50"]:.1f} | {ol["p90"]:.1f} | {ol["p99"]:.1f} | {ol["max"]:.1f} |')
prow("QoS 1 publish, closed loop", "c-publish", "ceiling")
prow("QoS 1 publish, closed loop", "p-publish", "plugin")
prow("QoS 1 publish, paced (broker CPU)", "c-publish-cpu", "ceiling")
prow("QoS 1 publish, paced (broker CPU)", "p-publish-cpu", "plugin")
prow("QoS 1 publish, paced", "c-publish-rate", "ceiling")
prow("QoS 1 publish, paced", "p-publish-rate", "plugin")
prow("QoS 1 publish, paced, with onboarding", "c-publish-onboard", "ceiling")
prow("QoS 1 publish, paced, with onboarding", "p-publish-onboard", "plugin")
print()
for name in ["ceiling", "plugin"]:
    h, m = R[f"{name}-hold"], R[f"{name}-rss"]
    print(f'- {name}: {h["established"]:,} of {h["connections"]:,} sessions held at once '
          f'({"all" if h["all_open_at_once"] else "NOT all"} open at once, {h["closed_early"]} closed early); '
          f'VmRSS idle {m["idle_kib"] / 1024:.1f} MiB, with the sessions held {m["held_kib"] / 1024:.1f} MiB, '
          f'highest sampled {m["peak_sampled_kib"] / 1024:.1f} MiB, VmHWM {m["hwm_kib"] / 1024:.1f} MiB')
sessions = lambda r: ", ".join(f"{k} ×{v:,}" for k, v in r["tls_sessions"].items())
print(f'- TLS negotiated: ceiling {sessions(R["c-returning"])}; plugin {sessions(R["p-returning"])}')
print(f"- serve counted {registered_by_new:,} registrations during the new-device run (generator: {R['p-new']['ok']:,} accepted)")
for phase, c in phases.items():
    if c:
        print(f"- plugin broker log, phase {phase}: CONNECTs let in after asking serve {c['from_serve']:,}, "
              f"from the plugin's cache {c['from_cache']:,}, refused {c['refused']}")
    else:
        print(f"- plugin broker log, phase {phase}: missing")
problems = []
for name, r in R.items():
    if name.endswith("-rss"):
        continue
    if r.get("errors_total"):
        problems.append(f"{name}: {r['errors_total']} errors {r['error_samples']}")
    if r.get("lost_sessions") or r.get("unacked_at_end"):
        problems.append(f"{name}: {r['lost_sessions']} sessions lost, {r['unacked_at_end']} unacked {r['error_samples']}")
    if r.get("onboarding") and r["onboarding"]["errors_total"]:
        problems.append(f"{name} onboarding: {r['onboarding']['errors_total']} errors {r['onboarding']['error_samples']}")
    if r.get("mode") == "hold" and not r["all_open_at_once"]:
        problems.append(f"{name}: not every session open at once {r['error_samples']}")
for k in ("new", "returning"):
    if api[k]["errors"]:
        problems.append(f"broker API timing ({k}): {api[k]['errors']} errors {api[k]['error_samples']}")
if api["new"]["registered"] != api["new"]["calls"]:
    problems.append(f"broker API timing: {api['new']['registered']} of {api['new']['calls']} first calls registered")
if registered_by_new != R["p-new"]["ok"]:
    problems.append(f"serve registered {registered_by_new} devices, the generator saw {R['p-new']['ok']} first connects accepted")
for p in problems:
    print(f"- WARNING: {p}")
if os.environ.get("SUMMARY_JSON"):
    json.dump({"started": started, "revision": revision, "goals": {
        "returning_vs_ceiling": g_ret, "returning_uncached_vs_ceiling": g_unc, "new_vs_ceiling": g_new,
        "new_bound_per_second": bound, "returning_uncached_bound_per_second": bound_uncached, "api_timing": api, "publish_vs_ceiling": g_pub, "publish_capacity_vs_ceiling": g_pub_cpu, "p99_publish_onboarding_ratio": g_onb,
        "p99_returning_half_ms": p99_half, "p99_new_half_ms": p99_new_half,
        "rss_held_kib": {"plugin": R["plugin-rss"]["held_kib"], "ceiling": R["ceiling-rss"]["held_kib"]}},
        "runs": R, "plugin_counters": phases, "serve_counts": serve_counts, "problems": problems},
        open(os.environ["SUMMARY_JSON"], "w"), indent=2)
EOF
