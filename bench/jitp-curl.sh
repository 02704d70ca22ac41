#!/usr/bin/env bash
# JITP first connects against nginx, driven by a generator that is not ours: curl.
#
#   usage: bench/jitp-curl.sh [DEVICES] [CONCURRENCY] [CURL_PROCESSES]     (3000 16 2)
#
# The cross-check of bench/compare-jitp.sh's ratios with an independent client. curl
# (Debian's, `--parallel`) makes one POST /v1/connect per device, each a new TCP
# connection and full mutual-TLS handshake with that device's certificate (a transfer per
# certificate: curl reuses neither connections nor TLS sessions across client
# certificates, and --no-sessionid is set anyway), CONCURRENCY in flight over
# CURL_PROCESSES curl processes (one curl runs its transfers on one thread and one core
# is not enough to load either server):
#   1. fleetcert first connects: every device once against a fresh `serve` (201 each);
#   2. nginx (`ssl_verify_client on`, the same server certificate and CA, static 200) with
#      the same devices;
#   3. fleetcert returning connects: the same devices again (200 each).
# Rates are devices / wall time of the curl command; every answer's status is counted
# from curl's --write-out, and fleetcert's from serve's /metrics. The report says how
# much CPU the curl processes used: a generator that saturates its cores measures
# itself, not the server. Everything listens on 127.0.0.1;
# every process started here is killed on exit. KEEP_WORK=1 keeps the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

note() { echo "jitp-curl: $*" >&2; }
usage() { sed -n '4p' "$0" | sed 's/^# \{0,1\}//' >&2; }
case "${1:-}" in -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
if [ $# -gt 3 ]; then usage; exit 2; fi
devices=${1:-3000}
concurrency=${2:-16}
processes=${3:-2}
for value in "$devices" "$concurrency" "$processes"; do
    [[ $value =~ ^[1-9][0-9]{0,5}$ ]] || { note "'$value' is not a positive integer (at most 6 digits)"; usage; exit 2; }
done
for tool in curl nginx python3; do
    command -v "$tool" >/dev/null || { note "$tool is not installed (Debian: curl, nginx-light, python3)"; exit 1; }
done
unset FLEETCERT_DATA_DIR FLEETCERT_DATABASE_URL FLEETCERT_CA_PASSPHRASE

note "building release binaries"
cargo build --release --quiet -p fleetcert
fleetcert=$PWD/target/release/fleetcert

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-jitp-curl.XXXXXX")
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "${KEEP_WORK:-0}" = 1 ]; then note "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
read -r port_tls port_admin port_nginx < <(free_ports 3)

data=$work/data
note "provisioning $devices devices in $work"
"$fleetcert" --data-dir "$data" ca init >/dev/null
"$fleetcert" --data-dir "$data" ca export >"$work/root.pem"
"$fleetcert" --data-dir "$data" ca export --chain >"$work/chain.pem"
{ echo thing_name; seq -f 'curl-bench-%07g' 1 "$devices"; } >"$work/devices.csv"
"$fleetcert" --data-dir "$data" provision --batch "$work/devices.csv" --out "$work/devices" 2>/dev/null
"$fleetcert" --data-dir "$data" serve --listen "127.0.0.1:$port_tls" \
    --admin-listen "127.0.0.1:$port_admin" --server-name localhost >"$work/serve.log" 2>&1 &
serve_pid=$!
pids+=("$serve_pid")
wait_for_port "$port_tls" "fleetcert serve" "$serve_pid"

start_nginx_mtls "$work/nginx" "$port_nginx" "$data/server/server.crt" "$data/server/server.key" "$work/chain.pem"
pids+=("$nginx_pid")
wait_for_port "$port_nginx" nginx "$nginx_pid"

# curl configs per server, one per curl process (the devices dealt out among them, the
# concurrency split): a transfer per device, each with its own certificate.
config() { # PORT PREFIX
    python3 - "$work/devices" "$work/root.pem" "$1" "$concurrency" "$processes" "$2" <<'EOF'
import os, sys
devices, root, port, concurrency, processes, prefix = sys.argv[1:]
concurrency, processes = int(concurrency), int(processes)
names = sorted(f[:-4] for f in os.listdir(devices) if f.endswith(".crt") and f != "chain.pem")
for k in range(processes):
    share = -(-concurrency // processes) if k < concurrency % processes or concurrency % processes == 0 else concurrency // processes
    with open(f"{prefix}.{k}", "w") as out:
        out.write(f"parallel\nparallel-max = {max(1, share)}\nparallel-immediate\nsilent\nshow-error\n")
        for i, n in enumerate(names[k::processes]):
            if i:
                out.write("next\n")
            out.write(f'url = "https://localhost:{port}/v1/connect"\nresolve = "localhost:{port}:127.0.0.1"\n')
            out.write(f'cacert = "{root}"\ncert = "{devices}/{n}.crt"\nkey = "{devices}/{n}.key"\n')
            out.write('request = "POST"\ndata = ""\nno-sessionid\noutput = "/dev/null"\nwrite-out = "%{http_code}\\n"\n')
EOF
}
config "$port_tls" "$work/fleetcert.curl"
config "$port_nginx" "$work/nginx.curl"

connects() { # the server's connect counter, by status
    curl -fsS "http://127.0.0.1:$port_admin/metrics" | python3 -c '
import re, sys
total = 0
for line in sys.stdin:
    if line.startswith("fleetcert_connects_total"):
        total += float(line.rsplit(" ", 1)[1])
print(int(total))'
}
timed() { # NAME CONFIG-PREFIX: runs the curl processes, writes NAME.json (wall seconds, their CPU seconds, statuses)
    local name=$1 cfg=$2 t0 t1
    t0=$EPOCHREALTIME
    local TIMEFORMAT='%U %S' # bash's `time`: the curl processes' user and system CPU seconds
    {
        time {
            local curls=()
            for ((k = 0; k < processes; k++)); do
                curl -K "$cfg.$k" >"$work/$name.codes.$k" 2>"$work/$name.err.$k" &
                curls+=($!)
            done
            wait "${curls[@]}" # not serve's and nginx's
        }
    } 2>"$work/$name.cpu" || true
    cat "$work/$name".codes.* >"$work/$name.codes"
    t1=$EPOCHREALTIME
    python3 - "$work/$name" "$t0" "$t1" >"$work/$name.json" <<'EOF'
import collections, json, sys
base, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
codes = collections.Counter(l.strip() for l in open(base + ".codes") if l.strip())
user, system = map(float, open(base + ".cpu").read().split()[-2:])
wall = t1 - t0
print(json.dumps({"wall_seconds": wall, "statuses": dict(codes), "transfers": sum(codes.values()),
                  "curl_cpu_seconds": user + system, "curl_cpu_share": (user + system) / wall}))
EOF
}
before=$(connects)
note "fleetcert: first connects ($devices devices, concurrency $concurrency)"
timed first "$work/fleetcert.curl"
after_first=$(connects)
note "nginx: the same devices"
timed nginx "$work/nginx.curl"
note "fleetcert: returning connects (the same devices again)"
timed returning "$work/fleetcert.curl"
after_returning=$(connects)
curl_version=$(curl --version | awk 'NR == 1 {print $1 " " $2}')
nginx_version=$(nginx -v 2>&1 | sed 's/^nginx version: //')

python3 - "$work" "$devices" "$concurrency" "$((after_first - before))" "$((after_returning - after_first))" \
    "$curl_version" "$nginx_version" <<'EOF'
import json, os, sys
work, devices, concurrency, counted_first, counted_returning, curl_version, nginx_version = sys.argv[1:]
devices, concurrency = int(devices), int(concurrency)
load = lambda n: json.load(open(os.path.join(work, n + ".json")))
first, nginx, returning = load("first"), load("nginx"), load("returning")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"Machine: {cpu}, {os.cpu_count()} cores; {curl_version} (`--parallel`), {nginx_version}; "
      f"{devices:,} devices, concurrency {concurrency}, a new connection and full mutual-TLS handshake per device.")
print()
print("| run | devices/s | statuses | server counted | curl CPU (cores) | vs nginx |")
print("|---|---:|---|---:|---:|---:|")
rate = lambda r: r["transfers"] / r["wall_seconds"]
def row(label, r, expect, counted=None):
    ok = r["statuses"].get(expect, 0)
    statuses = ", ".join(f"{k} ×{v:,}" for k, v in sorted(r["statuses"].items()))
    c = "—" if counted is None else f"{int(counted):,}" + (" (= ok)" if int(counted) == ok else " (≠ ok!)")
    vs = "—" if r is nginx else f"{rate(r) / rate(nginx):.2f}×"
    print(f"| {label} | {rate(r):,.0f} | {statuses} | {c} | {r['curl_cpu_share']:.2f} | {vs} |")
    return ok == devices and (counted is None or int(counted) == ok)
clean = [row("fleetcert first connects (201)", first, "201", counted_first),
         row("nginx, static 200", nginx, "200"),
         row("fleetcert returning connects (200)", returning, "200", counted_returning)]
print()
ratio = rate(first) / rate(nginx)
print(f"- first connects ≥ 0.8× nginx under curl: {ratio:.2f}× — {'met' if ratio >= 0.8 else 'not met'}")
if not all(clean):
    print("- WARNING: a run had other statuses or a counter mismatch; its rate is not a clean success rate")
print(f"- curl used {first['curl_cpu_share']:.2f} / {nginx['curl_cpu_share']:.2f} of the machine's {os.cpu_count()} cores "
      "during the first-connect / nginx runs: what it used, the servers could not")
EOF
