#!/usr/bin/env bash
# fleetcert beside the tools a user would pick instead: one command, one machine, several
# runs, so that a goal counts as met only if it is met in every run.
#
#   usage: bench/compare.sh [--quick] [--runs N] [--out FILE]
#
#   1. issuance   bench/compare-issuance.sh  fleetcert `provision --batch` (generated keys,
#                 as device files and as one `--pallet` file; device CSRs) against
#                 `cfssl serve` newcert (without and with its SQLite certdb) / sign driven
#                 by wrk, and an openssl command-line script.               RUNS times
#   2. JITP       bench/compare-jitp.sh      first and returning mutual-TLS connects against
#                 nginx (`ssl_verify_client on`, same certificates), peak and half load.
#                                                     RUNS times at each JITP_CONCURRENCY
#   3. memory     bench/compare-memory.sh    `fleetcert serve` idle, with 1,000 connections
#                 held open, and with 1,000 handshakes in flight.                  once
#
# Run k is issuance, then JITP at each concurrency in turn; runs 1..N, then memory. Between
# any two parts the file system settles (sync, 5 s). Each part checks its own figures
# (every fleetcert run against the server's /metrics or the files and registry it wrote;
# every cfssl answer for success; nginx's and cfssl's error counts) and writes a JSON
# summary; every run's summary and table is kept in a work directory (issuance-K.json/.md,
# jitp-cC-K.json/.md, memory.json/.md). This script prints, as markdown on stdout (and to
# --out FILE), the goals table: one row per goal (per concurrency for JITP) with every
# run's ratio, the worst of them, and "met in every run" or "**not met** in run k of N";
# then each part's full table from run 1. Progress goes to stderr. Ratios are the figures
# to compare: the machine is shared and absolute rates drift. Every part rebuilds the
# release binaries; if they changed between parts (the checkout was edited meanwhile),
# the report says so with a WARNING.
#
# Runs (environment or flag): RUNS (3; --runs N overrides; 1..10) and JITP_CONCURRENCY
# ("8 16 32"; a space- or comma-separated list of positive integers).
# Sizes (environment): PROVISION_DEVICES (20000) ISSUANCE_SECONDS (10) JITP_DEVICES (3000)
# JITP_SECONDS (10) MEMORY_DEVICES (2000) MEMORY_CONNECTIONS (1000) MEMORY_SECONDS (10).
# --quick: a smoke run (its figures mean little) with small defaults: PROVISION_DEVICES
# 2000, ISSUANCE_SECONDS 3, JITP_DEVICES 500, JITP_SECONDS 3, JITP_CONCURRENCY "8 32",
# MEMORY_DEVICES 300, MEMORY_CONNECTIONS 200, MEMORY_SECONDS 3, OPENSSL_DEVICES 20,
# SIGN_CSRS 100; still RUNS runs.
# KEEP_WORK=1 keeps the work directory (otherwise removed on exit); the parts' own temp
# directories are always removed (run a part alone with KEEP_WORK=1 to keep those).
# Missing tools (cfssl, wrk, nginx) are installed from Debian's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

usage() { sed -n '5p' "$0" | sed 's/^# \{0,1\}//' >&2; }
help() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
note() { echo "compare: $*" >&2; }

out=
quick=0
runs=${RUNS:-3}
runs_from="RUNS"
while [ $# -gt 0 ]; do
    case $1 in
    --quick) quick=1 ;;
    --out)
        [ $# -ge 2 ] || { note "--out needs a file name"; exit 2; }
        out=$2
        shift
        ;;
    --runs)
        [ $# -ge 2 ] || { note "--runs needs a number"; exit 2; }
        runs=$2
        runs_from="--runs"
        shift
        ;;
    --runs=*) runs=${1#--runs=}; runs_from="--runs" ;;
    -h | --help) help; exit 0 ;;
    *) note "unknown argument '$1'"; usage; exit 2 ;;
    esac
    shift
done
if ! [[ $runs =~ ^[1-9][0-9]?$ ]] || [ "$runs" -gt 10 ]; then
    note "$runs_from must be a whole number from 1 to 10, not '$runs'"
    exit 2
fi

if [ "$quick" = 1 ]; then
    : "${PROVISION_DEVICES:=2000}" "${ISSUANCE_SECONDS:=3}" "${JITP_DEVICES:=500}" "${JITP_SECONDS:=3}"
    : "${MEMORY_DEVICES:=300}" "${MEMORY_CONNECTIONS:=200}" "${MEMORY_SECONDS:=3}"
    : "${JITP_CONCURRENCY:=8 32}"
    export OPENSSL_DEVICES=${OPENSSL_DEVICES:-20} SIGN_CSRS=${SIGN_CSRS:-100}
fi
provision_devices=${PROVISION_DEVICES:-20000}
issuance_seconds=${ISSUANCE_SECONDS:-10}
jitp_devices=${JITP_DEVICES:-3000}
jitp_seconds=${JITP_SECONDS:-10}
memory_devices=${MEMORY_DEVICES:-2000}
memory_connections=${MEMORY_CONNECTIONS:-1000}
memory_seconds=${MEMORY_SECONDS:-10}

# JITP_CONCURRENCY: positive integers separated by spaces and/or commas, each once.
jitp_concurrency=${JITP_CONCURRENCY:-8 16 32}
concurrencies=()
set -f
listed=(${jitp_concurrency//,/ })
set +f
for c in ${listed[@]+"${listed[@]}"}; do
    if ! [[ $c =~ ^[1-9][0-9]{0,5}$ ]]; then
        note "JITP_CONCURRENCY must list positive whole numbers (up to 999999), not '$c' in '$jitp_concurrency'"
        exit 2
    fi
    for seen in ${concurrencies[@]+"${concurrencies[@]}"}; do
        if [ "$seen" = "$c" ]; then
            note "JITP_CONCURRENCY lists $c twice: '$jitp_concurrency'"
            exit 2
        fi
    done
    concurrencies+=("$c")
done
if [ ${#concurrencies[@]} -eq 0 ]; then
    note "JITP_CONCURRENCY lists no concurrency: '$jitp_concurrency'"
    exit 2
fi

if [ -n "$out" ] && ! touch "$out" 2>/dev/null; then
    note "cannot write --out $out"
    exit 2
fi

work=
cleanup() {
    if [ "$added_policy_rc" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    if [ -n "$work" ]; then
        if [ "${KEEP_WORK:-0}" = 1 ]; then note "kept $work"; else rm -rf "$work"; fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the peers ----------------------------------------------------------------------
missing=()
command -v cfssl >/dev/null || missing+=(golang-cfssl)
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    install_debian_packages "${missing[@]}"
fi

note "building release binaries"
cargo build --release --quiet -p fleetcert -p fleetcert-bench

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-compare.XXXXXX")

# Between parts: let the previous part's deletions and writeback settle, so one part's
# file system work does not land in the next one's figures.
settle() { sync; sleep 5; }

# The parts' own temp directories go with them (KEEP_WORK is about this script's). Each
# part builds the release binaries again; their digests after each part show whether the
# checkout was rebuilt between runs (the report warns if so).
part() { # NAME SCRIPT ARGS... — writes $work/NAME.json, .md, .started, .binaries
    local name=$1
    shift
    date -u +%Y-%m-%dT%H:%M:%SZ >"$work/$name.started"
    KEEP_WORK=0 SUMMARY_JSON=$work/$name.json "$@" >"$work/$name.md"
    sha256sum target/release/fleetcert target/release/fleetcert-bench |
        awk '{printf "%s%s", sep, substr($1, 1, 12); sep = " "} END {print ""}' >"$work/$name.binaries"
}

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
steps=$((runs * (1 + ${#concurrencies[@]}) + 1))
step=0
for run in $(seq 1 "$runs"); do
    step=$((step + 1))
    note "$step/$steps run $run of $runs, issuance: $provision_devices devices, ${issuance_seconds}s per cfssl endpoint"
    settle
    part "issuance-$run" bench/compare-issuance.sh "$provision_devices" "$issuance_seconds"
    for c in "${concurrencies[@]}"; do
        step=$((step + 1))
        note "$step/$steps run $run of $runs, JITP: $jitp_devices devices, ${jitp_seconds}s runs, concurrency $c"
        settle
        part "jitp-c$c-$run" bench/compare-jitp.sh "$jitp_devices" "$jitp_seconds" "$c"
    done
done
step=$((step + 1))
note "$step/$steps memory: $memory_connections connections, ${memory_seconds}s"
settle
part memory bench/compare-memory.sh "$memory_devices" "$memory_connections" "$memory_seconds"

revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then revision+=" (with uncommitted changes)"; fi

python3 - "$work" "$started" "$revision" "$quick" "$runs" "${KEEP_WORK:-0}" "${concurrencies[@]}" <<'EOF' | tee ${out:+"$out"}
import json, os, platform, sys
work, started, revision, quick, runs, keep_work, *concurrencies = sys.argv[1:]
runs = int(runs)
load = lambda name: json.load(open(os.path.join(work, name + ".json")))
part = lambda name: open(os.path.join(work, name + ".md")).read().rstrip()
when = lambda name: open(os.path.join(work, name + ".started")).read().strip()
issuance = [load(f"issuance-{k}") for k in range(1, runs + 1)]
jitp = {c: [load(f"jitp-c{c}-{k}") for k in range(1, runs + 1)] for c in concurrencies}
memory = load("memory")

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem_gib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) / 2**20
print(f"# fleetcert beside its peers — {started}")
print()
if quick == "1":
    print("**Quick smoke run (`--quick`): sizes too small for the figures to mean anything.**")
    print()
first_jitp = jitp[concurrencies[0]][0]
print(f"fleetcert {revision}; {cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, "
      f"{platform.system()} {platform.release()}; cfssl {issuance[0]['versions']['cfssl']}, "
      f"{first_jitp['nginx_version']}, {issuance[0]['versions']['openssl']}, wrk {issuance[0]['versions']['wrk']}. "
      "Load generators and servers share the cores; everything on 127.0.0.1.")
print()
print(f"{runs} run{'s' if runs > 1 else ''}, each: issuance ({issuance[0]['devices']:,} devices, "
      f"{issuance[0]['seconds']} s per cfssl endpoint), then JITP ({first_jitp['devices']:,} devices, "
      f"{first_jitp['seconds']:g} s per timed run) at concurrency {', '.join(concurrencies)}; then memory once "
      f"({memory['connections']:,} connections). Started at "
      + ", ".join(f"{when(f'issuance-{k}')[11:16]} (run {k})" for k in range(1, runs + 1))
      + f", {when('memory')[11:16]} (memory) UTC.")
print()

def ratio_text(v):
    if v is None:
        return "—"
    return f"{v:,.0f}×" if v >= 100 else f"{v:.1f}×" if v >= 10 else f"{v:.2f}×"
def ms_text(v):
    return "—" if v is None else f"{v:.1f} ms"
def span(values, fmt, unit=""):
    """Over the runs: 'x unit' when every run reads the same, else 'low–high unit'."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    lo, hi = fmt(min(vals)), fmt(max(vals))
    return (lo if lo == hi else f"{lo}–{hi}") + unit
count = lambda v: f"{v:,.0f}"
ms = lambda v: f"{v:.1f}"
div = lambda a, b: a / b if a is not None and b else None
at_least = lambda want: (lambda v: v is not None and v >= want)
def status(values, test):
    """'met in every run', or in which runs the goal was not met (or had no figure)."""
    n = len(values)
    failed = [str(k) for k, v in enumerate(values, 1) if v is not None and not test(v)]
    missing = [str(k) for k, v in enumerate(values, 1) if v is None]
    if not failed and not missing:
        return "met in every run" if n > 1 else "met"
    runs_text = lambda ks: f'in run{"s" if len(ks) > 1 else ""} {", ".join(ks)} of {n}' if n > 1 else ""
    parts = ([f"**not met** {runs_text(failed)}".rstrip()] if failed else []) + \
        ([f"**not measured** {runs_text(missing)}".rstrip()] if missing else [])
    return "; ".join(parts)

# One row: (comparison, fleetcert's range, the peer's range, goal, the value of each run,
# its formatter, the goal's test (None: context, no goal), which value is the worst).
rows = []
def add(name, ours, ours_unit, peer, theirs, goal, values, test=None, peer_fmt=count):
    rows.append((name, span(ours, count, ours_unit), f"{peer} {span(theirs, peer_fmt, '/s')}",
                 goal, values, ratio_text, test, min))
rates = [i["rates"] for i in issuance]
gen = [r["fleetcert_generated"] for r in rates]
pallet = [r.get("fleetcert_generated_pallet") for r in rates]
newcert = [r["cfssl_newcert"] for r in rates]
newcert_db = [i["cfssl_newcert_certdb"]["ok_per_second"] for i in issuance]
goal = lambda key: [i["goals"][key]["value"] for i in issuance]
add("batch provisioning, generated P-256 keys, durable SQLite + device files",
    gen, " devices/s", "cfssl newcert", newcert, "≥ 8×",
    goal("batch_provisioning_vs_cfssl_newcert"), at_least(8.0))
add("same, against cfssl doing the same work (newcert with its SQLite certdb)",
    gen, " devices/s", "cfssl newcert + certdb", newcert_db, "≥ 8×",
    goal("batch_provisioning_vs_cfssl_newcert_certdb"), at_least(8.0))
add("same with `--pallet` (one JSON-lines file), against cfssl newcert + certdb",
    pallet, " devices/s", "cfssl newcert + certdb", newcert_db, "≥ 8×",
    [i["ratios"].get("fleetcert_pallet_vs_cfssl_newcert_certdb") for i in issuance], at_least(8.0))
openssl = [r["openssl_script"] for r in rates]
add("same (device files), against the openssl script", gen, " devices/s", "openssl", openssl, "—",
    [div(g, o) for g, o in zip(gen, openssl)], peer_fmt=lambda v: f"{v:,.1f}")
tmpfs = [(i.get("fleetcert_generated_files_on_tmpfs") or {}).get("per_second") for i in issuance]
if any(t is not None for t in tmpfs):
    add("&nbsp;&nbsp;context: same with the device files on tmpfs (registry on disk)",
        tmpfs, " devices/s", "cfssl newcert", newcert, "—", [div(t, n) for t, n in zip(tmpfs, newcert)])
signing = [i["in_process_signing"] for i in issuance]
add("&nbsp;&nbsp;context: signing alone, in process (no registry, no files)",
    [s["generated"]["per_second"] for s in signing], "/s", "cfssl newcert", newcert, "—",
    [div(s["generated"]["per_second"], n) for s, n in zip(signing, newcert)])
sign = [r["cfssl_sign"] for r in rates]
add("CSR issuance (`provision --batch` with CSRs)", [r["fleetcert_csr"] for r in rates],
    " certificates/s", "cfssl sign", sign, "≥ 5×", goal("csr_issuance_vs_cfssl_sign"), at_least(5.0))
add("&nbsp;&nbsp;context: CSR parse + verify + sign alone, in process",
    [s["csr"]["per_second"] for s in signing], "/s", "cfssl sign", sign, "—",
    [div(s["csr"]["per_second"], n) for s, n in zip(signing, sign)])
for c in concurrencies:
    js = jitp[c]
    nginx = [j["nginx"]["requests_per_second"] for j in js]
    add(f"JITP first connects (201), concurrency {c}", [j["first"]["requests_per_second"] for j in js],
        "/s", "nginx", nginx, "≥ 0.8×", [j["first_vs_nginx"] for j in js], at_least(0.8))
    add(f"JITP returning connects (200), concurrency {c}", [j["returning"]["requests_per_second"] for j in js],
        "/s", "nginx", nginx, "≥ 1.0×", [j["returning_vs_nginx"] for j in js], at_least(1.0))
    rows.append((f'p99 of returning connects at half of peak '
                 f'({span([j["half"]["requests_per_second"] for j in js], count, "/s")}), concurrency {c}',
                 span([j["p99_at_half_ms"] for j in js], ms, " ms"),
                 f'nginx {span([j["nginx_half"]["latency_ms"]["p99"] for j in js], ms, " ms")}',
                 "< 25 ms", [j["p99_at_half_ms"] for j in js], ms_text,
                 lambda v: v is not None and v < 25, max))

print(f"| comparison | fleetcert | peer | goal | {' / '.join(f'run {k}' for k in range(1, runs + 1))} "
      "| worst | |")
print("|---|---:|---:|---:|---:|---:|---|")
for name, ours, theirs, goal_text, values, fmt, test, worst in rows:
    known = [v for v in values if v is not None]
    worst_text = fmt(worst(known)) if known and len(known) == len(values) else "—"
    state = "" if test is None else status(values, test)
    print(f"| {name} | {ours} | {theirs} | {goal_text} | {' / '.join(fmt(v) for v in values)} "
          f"| {worst_text} | {state} |")
idle, peak = memory["goals"]["idle_rss_under_64_mib"], memory["goals"]["peak_rss_under_256_mib"]
met = lambda ok: "met" if ok else "**not met**"
print(f'| `serve` peak RSS, {memory.get("connections", 1000):,} connections held / in flight (one run) '
      f'| {peak["value_mib"]:.0f} MiB | — | < 256 MiB | {peak["value_mib"]:.0f} MiB | — '
      f'| {met(peak["met"]) if peak["measured"] else "**not measured**"} |')
print(f'| `serve` idle RSS: at start / after the load (one run) '
      f'| {idle["at_start_mib"]:.0f} / {idle["after_load_mib"]:.0f} MiB | — | < 64 MiB '
      f'| {idle["at_start_mib"]:.0f} / {idle["after_load_mib"]:.0f} MiB | — '
      f'| {met(idle["at_start_met"])} / {met(idle["after_load_met"])} |')
print()
print("Ratios are fleetcert's rate over the peer's, measured in the same run; *worst* is the "
      "smallest ratio (the largest p99) over the runs, and a goal is met only if it is met in every run. "
      "The fleetcert and peer columns give the range of rates over the runs.")
print()
names = [f"issuance-{k}" for k in range(1, runs + 1)] + [f"jitp-c{c}-{k}" for k in range(1, runs + 1)
        for c in concurrencies] + ["memory"]
binaries = {n: open(os.path.join(work, n + ".binaries")).read().strip() for n in names}
problems = []
if len(set(binaries.values())) > 1:
    problems.append("the release binaries changed during the benchmark (the checkout was rebuilt between "
                    "parts), so the runs did not all measure the same build; sha256 prefixes of fleetcert and "
                    "fleetcert-bench after each part: " + "; ".join(
                        f'{b} after {", ".join(n for n in names if binaries[n] == b)}'
                        for b in dict.fromkeys(binaries.values())))
problems += [f"issuance run {k}: {w}" for k, i in enumerate(issuance, 1) for w in i.get("warnings", [])]
problems += [f"JITP concurrency {c} run {k}: errors or counter mismatch in {p}"
             for c in concurrencies for k, j in enumerate(jitp[c], 1) for p in j.get("problems", [])]
problems += [f"memory: {w}" for w in memory.get("warnings", [])]
for p in problems:
    print(f"- WARNING: {p}")
if problems:
    print()
print("## Issuance: fleetcert, cfssl, openssl (run 1)")
print()
print(part("issuance-1"))
print()
print("## JITP over mutual TLS: fleetcert and nginx (run 1)")
print()
for c in concurrencies:
    if len(concurrencies) > 1:
        print(f"### Concurrency {c}")
        print()
    print(part(f"jitp-c{c}-1"))
    print()
print("## Memory of `fleetcert serve`")
print()
print(part("memory"))
print()
if runs > 1:
    other = "run 2" if runs == 2 else f"runs 2–{runs}"
    names = f"issuance-K.md, jitp-cC-K.md and their .json summaries for {other}"
    if keep_work == "1":
        print(f"The other runs' full tables are kept in `{work}` ({names}).")
    else:
        print(f"The other runs' full tables ({names}) were in a temporary directory, removed on exit; "
              "KEEP_WORK=1 keeps it.")
    print()
EOF
