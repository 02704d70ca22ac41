#!/usr/bin/env bash
# JITP over mutual TLS, fleetcert against nginx, same machine, same run, same generator.
#
#   usage: bench/compare-jitp.sh [DEVICES] [SECONDS] [CONCURRENCY]     (3000 10 32)
#
# 1. Release builds of fleetcert and fleetcert-bench.
# 2. A fresh data directory: `ca init`, `provision --batch` of DEVICES things.
# 3. `fleetcert serve` on loopback; the generator measures first connects (every device
#    once, --new-devices), returning connects (SECONDS at CONCURRENCY), then returning
#    connects paced at half the returning peak (p99 at half load). Every run is
#    cross-checked against the server's fleetcert_connects_total.
# 4. nginx (Debian nginx-light, installed if missing) as a throwaway process: the same
#    server certificate and CA, ssl_verify_client on, a static 200 — the ceiling for a
#    mutual-TLS server on this machine. Measured at peak and at half of its peak.
# 5. A markdown table on stdout (progress on stderr). KEEP_WORK=1 keeps the temp dir
#    (the generator's JSON documents are in it); SUMMARY_JSON=FILE also writes the
#    figures as one JSON object (bench/compare.sh reads it).
#
# Every request is a new TCP connection + full TLS handshake (no resumption) + one
# HTTP/1.1 POST /v1/connect + the response + close. Everything listens on 127.0.0.1 and
# every process started here is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
devices=${1:-3000}
seconds=${2:-10}
concurrency=${3:-32}

note() { echo "compare-jitp: $*" >&2; }

note "building release binaries"
cargo build --release --quiet -p fleetcert -p fleetcert-bench
fleetcert=$PWD/target/release/fleetcert
bench=$PWD/target/release/fleetcert-bench

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-compare-jitp.XXXXXX")
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    if [ "$added_policy_rc" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    if [ "${KEEP_WORK:-0}" = 1 ]; then note "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r port_tls port_admin port_nginx < <(free_ports 3)

# --- fleetcert: CA, devices, server -------------------------------------------------
data=$work/data
note "provisioning $devices devices in $work"
"$fleetcert" --data-dir "$data" ca init >/dev/null
"$fleetcert" --data-dir "$data" ca export >"$work/root.pem"
"$fleetcert" --data-dir "$data" ca export --chain >"$work/chain.pem"
{ echo thing_name; seq -f 'jitp-bench-%07g' 1 "$devices"; } >"$work/pallet.csv"
"$fleetcert" --data-dir "$data" --output json provision --batch "$work/pallet.csv" \
    --out "$work/devices" 2>/dev/null | tail -n 1 >"$work/provision.json"

"$fleetcert" --data-dir "$data" serve --listen "127.0.0.1:$port_tls" \
    --admin-listen "127.0.0.1:$port_admin" --server-name localhost \
    >"$work/serve.log" 2>&1 &
serve_pid=$!
pids+=("$serve_pid")
wait_for_port "$port_tls" "fleetcert serve" "$serve_pid"

generate() { # OUTPUT.json URL [generator options...]
    local out=$1 url=$2
    shift 2
    "$bench" jitp --url "$url" --certs "$work/devices" --ca "$work/root.pem" \
        --server-name localhost --concurrency "$concurrency" "$@" >"$out"
}
rps() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["requests_per_second"])' "$1"; }
half() { python3 -c 'import sys; print(round(float(sys.argv[1]) / 2, 1))' "$1"; }

fc_url=https://127.0.0.1:$port_tls/v1/connect
metrics=http://127.0.0.1:$port_admin/metrics
note "fleetcert: first connects ($devices devices, each once)"
generate "$work/fc-first.json" "$fc_url" --new-devices --duration 600 --metrics-url "$metrics"
note "fleetcert: returning connects (${seconds}s)"
generate "$work/fc-returning.json" "$fc_url" --duration "$seconds" --metrics-url "$metrics"

# --- nginx --------------------------------------------------------------------------
if ! command -v nginx >/dev/null 2>&1; then
    install_debian_packages nginx-light
fi
start_nginx_mtls "$work/nginx" "$port_nginx" "$data/server/server.crt" "$data/server/server.key" "$work/chain.pem"
pids+=("$nginx_pid")
wait_for_port "$port_nginx" nginx "$nginx_pid"

ngx_url=https://127.0.0.1:$port_nginx/v1/connect
note "nginx: new mutual-TLS connections (${seconds}s)"
generate "$work/nginx.json" "$ngx_url" --duration "$seconds"

# --- half load ----------------------------------------------------------------------
fc_half=$(half "$(rps "$work/fc-returning.json")")
ngx_half=$(half "$(rps "$work/nginx.json")")
note "fleetcert: returning connects at half its peak ($fc_half/s, ${seconds}s)"
generate "$work/fc-half.json" "$fc_url" --duration "$seconds" --rate "$fc_half" --metrics-url "$metrics"
note "nginx: at half its peak ($ngx_half/s, ${seconds}s)"
generate "$work/nginx-half.json" "$ngx_url" --duration "$seconds" --rate "$ngx_half"

serve_rss=$(awk '/VmHWM/ {print $2}' "/proc/$serve_pid/status" 2>/dev/null || echo 0)
nginx_version=$(nginx -v 2>&1 | sed 's/^nginx version: //')

# --- report -------------------------------------------------------------------------
python3 - "$work" "$devices" "$seconds" "$concurrency" "$nginx_version" "$serve_rss" <<'EOF'
import json, os, platform, sys
work, devices, seconds, concurrency, nginx_version, serve_rss = sys.argv[1:]
load = lambda name: json.load(open(os.path.join(work, name + ".json")))
first, returning, half = load("fc-first"), load("fc-returning"), load("fc-half")
nginx, nginx_half = load("nginx"), load("nginx-half")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
      f"{nginx_version}; generator and servers on the same cores, 127.0.0.1.")
print()
print(f"{devices} devices; concurrency {concurrency}; {seconds} s per timed run; a new TCP connection "
      "and full mutual-TLS handshake (no resumption) per request.")
print()
print("| run | requests/s | p50 ms | p90 ms | p99 ms | ok | errors | server counted | vs nginx |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
def row(label, r, ref=None):
    counted = "—" if r["server_counted"] is None else (
        f'{r["server_counted"]} ' + ("(= ok)" if r["server_counted_matches_ok"] else "(≠ ok!)"))
    errors = r["errors_total"]
    err = str(errors) if not errors else f'{errors} ' + str({k: v for k, v in r["errors"].items() if v})
    ratio = f'{r["requests_per_second"] / ref:.2f}×' if ref else "—"
    l = r["latency_ms"]
    print(f'| {label} | {r["requests_per_second"]:,.0f} | {l["p50"]:.1f} | {l["p90"]:.1f} | {l["p99"]:.1f} '
          f'| {r["ok"]:,} | {err} | {counted} | {ratio} |')
peak = nginx["requests_per_second"]
row(f"fleetcert first connects (201, each device once)", first, peak)
row(f"fleetcert returning connects (200)", returning, peak)
row(f"nginx, static 200", nginx)
row(f'fleetcert returning, paced at {half["rate"]:.0f}/s (half its peak)', half)
row(f'nginx, paced at {nginx_half["rate"]:.0f}/s (half its peak)', nginx_half)
print()
goals = [
    ("first connects ≥ 0.8× nginx", first["requests_per_second"] / peak, 0.8, "×"),
    ("returning connects ≥ 1.0× nginx", returning["requests_per_second"] / peak, 1.0, "×"),
]
for name, value, want, unit in goals:
    print(f'- {name}: {value:.2f}{unit} — {"met" if value >= want else "not met"}')
p99 = half["latency_ms"]["p99"]
print(f'- fleetcert p99 < 25 ms at half of peak: {p99:.1f} ms — {"met" if p99 < 25 else "not met"} '
      f'(nginx at half its peak: {nginx_half["latency_ms"]["p99"]:.1f} ms)')
sessions = lambda r: ", ".join(f"{k} ×{v:,}" for k, v in r["tls_sessions"].items())
print(f'- TLS negotiated: fleetcert {sessions(returning)}; nginx {sessions(nginx)}')
print(f'- fleetcert serve peak RSS over the runs (VmHWM): {int(serve_rss) / 1024:.0f} MiB')
bad = [n for n, r in [("first", first), ("returning", returning), ("half", half)]
       if r["errors_total"] or not r["server_counted_matches_ok"]]
bad += [n for n, r in [("nginx", nginx), ("nginx-half", nginx_half)] if r["errors_total"]]
if bad:
    print(f'- WARNING: errors or counter mismatches in: {", ".join(bad)}')
if os.environ.get("SUMMARY_JSON"):
    pick = lambda r: {k: r[k] for k in ("requests_per_second", "ok", "errors_total", "latency_ms",
                                        "server_counted", "server_counted_matches_ok")}
    json.dump({
        "nginx_version": nginx_version,
        "devices": int(devices), "seconds": float(seconds), "concurrency": int(concurrency),
        "first": pick(first), "returning": pick(returning), "half": pick(half),
        "nginx": pick(nginx), "nginx_half": pick(nginx_half),
        "first_vs_nginx": first["requests_per_second"] / peak,
        "returning_vs_nginx": returning["requests_per_second"] / peak,
        "p99_at_half_ms": p99,
        "serve_peak_rss_kib": int(serve_rss),
        "problems": bad,
    }, open(os.environ["SUMMARY_JSON"], "w"), indent=2)
EOF
