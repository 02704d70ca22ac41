#!/usr/bin/env bash
# Memory of `fleetcert serve`: idle, with CONNECTIONS idle mutual-TLS connections open at
# once, and under CONNECTIONS returning connects in flight (a new handshake per request).
#
#   usage: bench/compare-memory.sh [DEVICES] [CONNECTIONS] [SECONDS]     (2000 1000 10)
#
# 1. Release builds of fleetcert and fleetcert-bench.
# 2. A fresh data directory: `ca init`, `provision --batch` of DEVICES things. The
#    open-file limit is raised (65536, or the hard limit) for every process started here.
# 3. `fleetcert serve` on loopback; after it listens and settles (SETTLE seconds, 3),
#    its idle RSS (VmRSS of /proc/PID/status) and thread count.
# 4. Warm-up: every device connects once (first connects, `jitp --new-devices`, 32 at a
#    time), so the runs below are returning devices.
# 5. (i) `fleetcert-bench hold`: CONNECTIONS connections, one keep-alive POST /v1/connect
#    each, all held open and idle SECONDS after the last is established;
#    (ii) churn: `fleetcert-bench jitp --concurrency CONNECTIONS --duration SECONDS`
#    (returning connects, a new TCP connection and full handshake per request).
#    serve's VmRSS is sampled every ~100 ms during both; the maximum sample is reported.
# 6. 10 s after the last load (IDLE_AFTER): idle RSS again, and VmHWM (peak RSS over the
#    process's life, which no sampling can miss).
# 7. A markdown table on stdout (progress on stderr); if SUMMARY_JSON is set, every
#    figure as one JSON object in that file. KEEP_WORK=1 keeps the temp dir (the
#    generators' JSON documents, the RSS samples, serve's log).
#
# Everything listens on 127.0.0.1 and every process started here is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
devices=${1:-2000}
connections=${2:-1000}
seconds=${3:-10}
settle=${SETTLE:-3}
idle_after=${IDLE_AFTER:-10}

note() { echo "compare-memory: $*" >&2; }

note "building release binaries"
cargo build --release --quiet -p fleetcert -p fleetcert-bench
fleetcert=$PWD/target/release/fleetcert
bench=$PWD/target/release/fleetcert-bench

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-compare-memory.XXXXXX")
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    if [ "${KEEP_WORK:-0}" = 1 ]; then note "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Every connection is a file descriptor in both processes.
want_fds=65536
hard_fds=$(ulimit -Hn)
if [ "$hard_fds" = unlimited ] || [ "$hard_fds" -ge "$want_fds" ]; then
    ulimit -n "$want_fds"
else
    ulimit -n "$hard_fds"
fi
fd_limit=$(ulimit -n)
if [ "$fd_limit" != unlimited ] && [ "$fd_limit" -lt $((connections + 256)) ]; then
    note "WARNING: open-file limit $fd_limit is too low for $connections connections"
fi
note "open-file limit: $fd_limit"

read -r port_tls port_admin < <(free_ports 2)

# Fields of /proc/PID/status as one JSON object: {"VmRSS": kB, "VmHWM": kB, ...}.
snapshot() { # PID OUT.json
    python3 - "$1" >"$2" <<'EOF'
import json, sys
fields = {}
for line in open(f"/proc/{sys.argv[1]}/status"):
    key, _, value = line.partition(":")
    if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmData", "Threads"):
        fields[key] = int(value.split()[0])
print(json.dumps(fields))
EOF
}

# Appends "<seconds> <VmRSS kB> <threads>" to OUT every ~100 ms while PID lives; copies
# the whole status file whenever a new maximum is seen (OUT.peak-status).
sampler_pid=
start_sampler() { # PID OUT
    (
        pid=$1 out=$2 max=0
        while [ -r "/proc/$pid/status" ]; do
            rss=0 threads=0
            while read -r key value _; do
                case $key in
                VmRSS:) rss=$value ;;
                Threads:) threads=$value ;;
                esac
            done <"/proc/$pid/status" 2>/dev/null || break
            echo "$EPOCHREALTIME $rss $threads" >>"$out"
            if [ "$rss" -gt "$max" ]; then
                max=$rss
                cp "/proc/$pid/status" "$out.peak-status" 2>/dev/null || true
            fi
            sleep 0.1
        done
    ) &
    sampler_pid=$!
    pids+=("$sampler_pid")
}
stop_sampler() {
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
}

# --- fleet and server ---------------------------------------------------------------
data=$work/data
note "provisioning $devices devices in $work"
"$fleetcert" --data-dir "$data" ca init >/dev/null
"$fleetcert" --data-dir "$data" ca export >"$work/root.pem"
{ echo thing_name; seq -f 'mem-bench-%07g' 1 "$devices"; } >"$work/pallet.csv"
"$fleetcert" --data-dir "$data" --output json provision --batch "$work/pallet.csv" \
    --out "$work/devices" 2>/dev/null | tail -n 1 >"$work/provision.json"

"$fleetcert" --data-dir "$data" serve --listen "127.0.0.1:$port_tls" \
    --admin-listen "127.0.0.1:$port_admin" --server-name localhost \
    >"$work/serve.log" 2>&1 &
serve_pid=$!
pids+=("$serve_pid")
wait_for_port "$port_tls" "fleetcert serve" "$serve_pid"
wait_for_port "$port_admin" "fleetcert serve (admin)" "$serve_pid"
note "serve is pid $serve_pid; settling ${settle}s"
sleep "$settle"
snapshot "$serve_pid" "$work/idle-start.json"
serve_alive() {
    if ! kill -0 "$serve_pid" 2>/dev/null; then
        note "fleetcert serve died; its log:"
        tail -n 20 "$work/serve.log" >&2
        exit 1
    fi
}

url=https://127.0.0.1:$port_tls/v1/connect
metrics=http://127.0.0.1:$port_admin/metrics
common=(--url "$url" --certs "$work/devices" --ca "$work/root.pem" --server-name localhost)

note "warm-up: first connects of all $devices devices, 32 at a time"
"$bench" jitp "${common[@]}" --concurrency 32 --new-devices --duration 600 \
    --metrics-url "$metrics" --quiet >"$work/warmup.json"
serve_alive
sleep 1
snapshot "$serve_pid" "$work/after-warmup.json"

note "(i) hold: $connections connections open at once, idle ${seconds}s"
start_sampler "$serve_pid" "$work/rss-hold.txt"
"$bench" hold "${common[@]}" --connections "$connections" --seconds "$seconds" \
    --metrics-url "$metrics" >"$work/hold.json"
stop_sampler
serve_alive
sleep 2

note "(ii) churn: returning connects, $connections in flight, ${seconds}s"
start_sampler "$serve_pid" "$work/rss-churn.txt"
"$bench" jitp "${common[@]}" --concurrency "$connections" --duration "$seconds" \
    --metrics-url "$metrics" >"$work/churn.json"
stop_sampler
serve_alive

note "idle ${idle_after}s after the load"
sleep "$idle_after"
snapshot "$serve_pid" "$work/idle-after.json"

# --- report -------------------------------------------------------------------------
python3 - "$work" "$devices" "$connections" "$seconds" "$fd_limit" "$idle_after" <<'EOF'
import json, os, platform, sys
work, devices, connections, seconds, fd_limit, idle_after = sys.argv[1:]
devices, connections, seconds = int(devices), int(connections), float(seconds)
load = lambda name: json.load(open(os.path.join(work, name)))
mib = lambda kb: kb / 1024
idle_start, warm, idle_after_s = load("idle-start.json"), load("after-warmup.json"), load("idle-after.json")
warmup, hold, churn = load("warmup.json"), load("hold.json"), load("churn.json")

def samples(name):
    rows = []
    path = os.path.join(work, name)
    if os.path.exists(path):
        for line in open(path):
            parts = line.split()
            if len(parts) == 3:
                rows.append((float(parts[0]), int(parts[1]), int(parts[2])))
    return rows

def peak_status(name):
    path = os.path.join(work, name + ".peak-status")
    fields = {}
    if os.path.exists(path):
        for line in open(path):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                fields[key] = int(value.split()[0])
    return fields

hold_samples, churn_samples = samples("rss-hold.txt"), samples("rss-churn.txt")
if not hold_samples or not churn_samples:
    sys.exit("compare-memory: no RSS samples taken (sampler failed)")
hold_peak = max(s[1] for s in hold_samples)
churn_peak = max(s[1] for s in churn_samples)
hold_threads = max(s[2] for s in hold_samples)
churn_threads = max(s[2] for s in churn_samples)
hold_at_peak, churn_at_peak = peak_status("rss-hold.txt"), peak_status("rss-churn.txt")
hwm = idle_after_s["VmHWM"]
held_all = hold["max_open"] >= connections

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
      f"generator and server on the same cores, 127.0.0.1; open-file limit {fd_limit}.")
print()
print(f"{devices:,} devices (all first-connected in a warm-up); {connections:,} connections; "
      f"{seconds:g} s hold and {seconds:g} s churn; RSS = VmRSS of `fleetcert serve`, sampled every ~100 ms "
      f"({len(hold_samples)} samples during the hold, {len(churn_samples)} during churn).")
print()
if not held_all:
    print(f"**WARNING: hold kept at most {hold['max_open']:,} of {connections:,} connections open at once; "
          f"the {connections:,}-connection peak was not measured (see below).**")
    print()
print("| state | RSS MiB | anon MiB | threads | notes |")
print("|---|---:|---:|---:|---|")
def row(label, rss_kb, anon_kb, threads, notes):
    anon = "—" if anon_kb is None else f"{mib(anon_kb):.1f}"
    print(f"| {label} | {mib(rss_kb):.1f} | {anon} | {threads} | {notes} |")
row("idle at start", idle_start["VmRSS"], idle_start.get("RssAnon"), idle_start["Threads"],
    f"{os.environ.get('SETTLE', '3')} s after listening")
row("after first connects", warm["VmRSS"], warm.get("RssAnon"), warm["Threads"],
    f'{warmup["ok"]:,} first connects at concurrency 32 ({warmup["requests_per_second"]:,.0f}/s), '
    f'{warmup["errors_total"]} errors')
closed = hold["closed_early"]
idle_s = hold.get("closed_early_idle_seconds")
all_open = hold.get("all_open_seconds")
hold_notes = (f'{hold["established"]:,} established, {hold["failed"]:,} failed, ramp {hold["ramp_seconds"]:.1f} s, '
              + (f'all {connections:,} open for {all_open:.1f} s' if all_open is not None
                 else f'never all {connections:,} open at once'))
if closed:
    hold_notes += f'; **{closed:,} closed early by the server** after {idle_s["min"]:.1f}–{idle_s["max"]:.1f} s idle'
row(f"peak during hold ({hold['max_open']:,} open at once)", hold_peak, hold_at_peak.get("RssAnon"),
    hold_threads, hold_notes)
row(f"peak during churn ({connections:,} in flight)", churn_peak, churn_at_peak.get("RssAnon"),
    churn_threads,
    f'{churn["ok"]:,} returning connects ({churn["requests_per_second"]:,.0f}/s, p99 '
    f'{churn["latency_ms"]["p99"]:.0f} ms), {churn["errors_total"]} errors')
row("VmHWM (peak over the process's life)", hwm, None, "—", "")
row(f"idle after load ({idle_after} s later)", idle_after_s["VmRSS"], idle_after_s.get("RssAnon"),
    idle_after_s["Threads"], "")
print()

warnings = []
if not held_all:
    warnings.append(f"**HOLD DID NOT KEEP {connections:,} CONNECTIONS OPEN AT ONCE**: at most "
                    f"{hold['max_open']:,} were open at the same moment ({hold['established']:,} established, "
                    f"{hold['failed']:,} failed: "
                    + ", ".join(f"{k} {v}" for k, v in hold["errors"].items() if v)
                    + f"; samples: {hold['error_samples'][:3]}). The hold peak is NOT the "
                    f"{connections:,}-connection figure.")
notes = []
if closed:
    text = (f"the server closed {closed:,} of the held idle connections after "
            f"{idle_s['min']:.1f}–{idle_s['max']:.1f} s idle (by kind: "
            + ", ".join(f"{k} {v}" for k, v in hold["closed_early_by_kind"].items() if v)
            + f"; {', '.join(hold['error_samples'][:1])}); {hold['open_at_end']:,} were still open "
            "when the hold ended. `serve --request-timeout` (default 10 s) also ends idle "
            "keep-alive connections (hyper's header-read timeout restarts after each response)")
    if held_all and all_open is not None and all_open >= 1.0:
        notes.append(text + f"; all {connections:,} were open together for {all_open:.1f} s before that, "
                     "which the hold peak covers")
    else:
        warnings.append(text)
if warmup["errors_total"] or churn["errors_total"]:
    warnings.append(f'errors: warm-up {warmup["errors"] if warmup["errors_total"] else 0}, '
                    f'churn {churn["errors"] if churn["errors_total"] else 0} '
                    f'(samples: {churn["error_samples"][:3]})')
for name, r in (("warm-up", warmup), ("churn", churn)):
    if r.get("server_counted_matches_ok") is False:
        warnings.append(f'{name}: the server counted {r["server_counted"]} connects, the generator {r["ok"]} ok')
m = hold.get("metrics") or {}
if m and m.get("counted_matches_established") is False:
    warnings.append(f'hold: the server counted {m.get("counted_during_ramp")} connects during the ramp, '
                    f'the generator established {hold["established"]}')

idle_worst = max(idle_start["VmRSS"], idle_after_s["VmRSS"])
idle_start_met = idle_start["VmRSS"] < 64 * 1024
idle_after_met = idle_after_s["VmRSS"] < 64 * 1024
idle_met = idle_start_met and idle_after_met
verdict = lambda ok: "met" if ok else "not met"
print(f'- idle RSS < 64 MiB: {mib(idle_start["VmRSS"]):.1f} MiB at start — {verdict(idle_start_met)}; '
      f'{mib(idle_after_s["VmRSS"]):.1f} MiB {idle_after} s after load — {verdict(idle_after_met)}')
peak_kb = max(hwm, hold_peak, churn_peak)
if held_all:
    peak_met = peak_kb < 256 * 1024
    print(f'- peak RSS under {connections:,} concurrent connections < 256 MiB: {mib(peak_kb):.1f} MiB '
          f'(VmHWM; sampled peaks: hold {mib(hold_peak):.1f}, churn {mib(churn_peak):.1f}) — '
          f'{"met" if peak_met else "not met"}')
else:
    peak_met = None
    print(f'- peak RSS under {connections:,} concurrent connections < 256 MiB: NOT MEASURED — only '
          f'{hold["max_open"]:,} connections were open at once (VmHWM {mib(peak_kb):.1f} MiB)')
if connections != 1000:
    print(f'- note: the goal is stated for 1,000 connections; this run used {connections:,}')
gauges = m.get("open_connection_gauges") if m else None
print(f'- server-side count while held: {m.get("counted_during_ramp")} connects counted during the ramp '
      f'(`{m.get("counter")}`), {m.get("handshakes_during_ramp")} TLS handshakes; open-connection gauge: '
      + (", ".join(f"{k} = {v:g}" for k, v in gauges.items()) if gauges else "none exposed")
      if m else "- server metrics: not scraped")
for n in notes:
    print(f"- note: {n}")
for w in warnings:
    print(f"- WARNING: {w}")

summary = {
    "devices": devices, "connections": connections, "seconds": seconds,
    "fd_limit": int(fd_limit) if fd_limit.isdigit() else fd_limit,
    "idle_start_rss_mib": round(mib(idle_start["VmRSS"]), 1),
    "idle_start_threads": idle_start["Threads"],
    "after_first_connects_rss_mib": round(mib(warm["VmRSS"]), 1),
    "hold": {
        "peak_rss_mib": round(mib(hold_peak), 1), "peak_threads": hold_threads,
        "peak_anon_mib": round(mib(hold_at_peak["RssAnon"]), 1) if "RssAnon" in hold_at_peak else None,
        "samples": len(hold_samples), "max_open": hold["max_open"], "established": hold["established"],
        "failed": hold["failed"], "errors": hold["errors"], "all_open_at_once": held_all,
        "all_open_seconds": all_open, "ramp_seconds": round(hold["ramp_seconds"], 2),
        "closed_early": closed, "open_at_end": hold["open_at_end"],
    },
    "churn": {
        "peak_rss_mib": round(mib(churn_peak), 1), "peak_threads": churn_threads,
        "samples": len(churn_samples), "concurrency": connections, "ok": churn["ok"],
        "requests_per_second": round(churn["requests_per_second"], 1),
        "errors_total": churn["errors_total"], "p99_ms": churn["latency_ms"]["p99"],
    },
    "vmhwm_mib": round(mib(hwm), 1),
    "idle_after_rss_mib": round(mib(idle_after_s["VmRSS"]), 1),
    "idle_after_threads": idle_after_s["Threads"],
    "goals": {
        "idle_rss_under_64_mib": {"value_mib": round(mib(idle_worst), 1), "met": idle_met,
                                  "at_start_mib": round(mib(idle_start["VmRSS"]), 1),
                                  "at_start_met": idle_start_met,
                                  "after_load_mib": round(mib(idle_after_s["VmRSS"]), 1),
                                  "after_load_met": idle_after_met},
        "peak_rss_under_256_mib": {"value_mib": round(mib(peak_kb), 1), "met": peak_met,
                                   "measured": held_all},
    },
    "warnings": warnings,
    "notes": notes,
}
out = os.environ.get("SUMMARY_JSON")
if out:
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
EOF
