#!/usr/bin/env bash
# fleetcert beside the tools a user would pick instead: one command, one machine, one run.
#
#   usage: bench/compare.sh [--quick] [--out FILE]
#
#   1. issuance   bench/compare-issuance.sh  fleetcert `provision --batch` (generated keys;
#                 device CSRs) against `cfssl serve` newcert / sign driven by wrk, and an
#                 openssl command-line script.
#   2. JITP       bench/compare-jitp.sh      first and returning mutual-TLS connects against
#                 nginx (`ssl_verify_client on`, same certificates), peak and half load.
#   3. memory     bench/compare-memory.sh    `fleetcert serve` idle, with 1,000 connections
#                 held open, and with 1,000 handshakes in flight.
#
# Each part checks its own figures (every fleetcert run against the server's /metrics or
# the files and registry it wrote; every cfssl answer for success; nginx's and cfssl's
# error counts) and writes a JSON summary; this script prints the goals table, then each
# part's full table, as markdown on stdout (and to --out FILE). Progress goes to stderr.
# Ratios are the figures to compare: the machine is shared and absolute rates drift.
#
# Sizes (environment): PROVISION_DEVICES (20000) ISSUANCE_SECONDS (10) JITP_DEVICES (3000)
# JITP_SECONDS (10) JITP_CONCURRENCY (32) MEMORY_DEVICES (2000) MEMORY_CONNECTIONS (1000)
# MEMORY_SECONDS (10). --quick: a smoke run with small sizes (its figures mean little).
# Missing tools (cfssl, wrk, nginx) are installed from Debian's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; }
note() { echo "compare: $*" >&2; }

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
    : "${PROVISION_DEVICES:=2000}" "${ISSUANCE_SECONDS:=3}" "${JITP_DEVICES:=500}" "${JITP_SECONDS:=3}"
    : "${MEMORY_DEVICES:=300}" "${MEMORY_CONNECTIONS:=200}" "${MEMORY_SECONDS:=3}"
    export OPENSSL_DEVICES=${OPENSSL_DEVICES:-20} SIGN_CSRS=${SIGN_CSRS:-100}
fi
provision_devices=${PROVISION_DEVICES:-20000}
issuance_seconds=${ISSUANCE_SECONDS:-10}
jitp_devices=${JITP_DEVICES:-3000}
jitp_seconds=${JITP_SECONDS:-10}
jitp_concurrency=${JITP_CONCURRENCY:-32}
memory_devices=${MEMORY_DEVICES:-2000}
memory_connections=${MEMORY_CONNECTIONS:-1000}
memory_seconds=${MEMORY_SECONDS:-10}

# --- the peers ----------------------------------------------------------------------
missing=()
command -v cfssl >/dev/null || missing+=(golang-cfssl)
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    trap '[ "$added_policy_rc" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
    install_debian_packages "${missing[@]}"
fi

note "building release binaries"
cargo build --release --quiet -p fleetcert -p fleetcert-bench

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-compare.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

# Between parts: let the previous part's deletions and writeback settle, so one part's
# file system work does not land in the next one's figures.
settle() { sync; sleep 5; }

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
note "1/3 issuance: $provision_devices devices, ${issuance_seconds}s per cfssl endpoint"
settle
SUMMARY_JSON=$work/issuance.json bench/compare-issuance.sh "$provision_devices" "$issuance_seconds" >"$work/issuance.md"
note "2/3 JITP: $jitp_devices devices, ${jitp_seconds}s runs, concurrency $jitp_concurrency"
settle
SUMMARY_JSON=$work/jitp.json bench/compare-jitp.sh "$jitp_devices" "$jitp_seconds" "$jitp_concurrency" >"$work/jitp.md"
note "3/3 memory: $memory_connections connections, ${memory_seconds}s"
settle
SUMMARY_JSON=$work/memory.json bench/compare-memory.sh "$memory_devices" "$memory_connections" "$memory_seconds" >"$work/memory.md"

revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then revision+=" (with uncommitted changes)"; fi

python3 - "$work" "$started" "$revision" "$quick" <<'EOF' | tee ${out:+"$out"}
import json, os, platform, sys
work, started, revision, quick = sys.argv[1:]
load = lambda name: json.load(open(os.path.join(work, name + ".json")))
issuance, jitp, memory = load("issuance"), load("jitp"), load("memory")
part = lambda name: open(os.path.join(work, name + ".md")).read().rstrip()

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem_gib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) / 2**20
print(f"# fleetcert beside its peers — {started}")
print()
if quick == "1":
    print("**Quick smoke run (`--quick`): sizes too small for the figures to mean anything.**")
    print()
print(f"fleetcert {revision}; {cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, "
      f"{platform.system()} {platform.release()}; cfssl {issuance['versions']['cfssl']}, "
      f"{jitp['nginx_version']}, {issuance['versions']['openssl']}, wrk {issuance['versions']['wrk']}. "
      "Load generators and servers share the cores; everything on 127.0.0.1.")
print()
r, g = issuance["rates"], issuance["goals"]
met = lambda ok: "met" if ok else "**not met**"
rows = [
    ("batch provisioning, generated P-256 keys, durable SQLite + files",
     f'{r["fleetcert_generated"]:,.0f} devices/s', f'cfssl newcert {r["cfssl_newcert"]:,.0f}/s',
     g["batch_provisioning_vs_cfssl_newcert"]["value"], "≥ 8×", g["batch_provisioning_vs_cfssl_newcert"]["met"]),
    ("same, against cfssl doing the same work (newcert with its SQLite certdb)",
     f'{r["fleetcert_generated"]:,.0f} devices/s',
     f'cfssl newcert + certdb {issuance["cfssl_newcert_certdb"]["ok_per_second"]:,.0f}/s',
     g["batch_provisioning_vs_cfssl_newcert_certdb"]["value"], "≥ 8×",
     g["batch_provisioning_vs_cfssl_newcert_certdb"]["met"]),
    ("same, against the openssl script", f'{r["fleetcert_generated"]:,.0f} devices/s',
     f'openssl {r["openssl_script"]:,.1f}/s', r["fleetcert_generated"] / r["openssl_script"], "—", None),
]
tmpfs = issuance.get("fleetcert_generated_files_on_tmpfs")
if tmpfs:
    rows.append(("&nbsp;&nbsp;context: same with the device files on tmpfs (registry on disk)",
                 f'{tmpfs["per_second"]:,.0f} devices/s', f'cfssl newcert {r["cfssl_newcert"]:,.0f}/s',
                 tmpfs["per_second"] / r["cfssl_newcert"], "—", None))
signing = issuance["in_process_signing"]
rows += [
    ("&nbsp;&nbsp;context: signing alone, in process (no registry, no files)",
     f'{signing["generated"]["per_second"]:,.0f}/s', f'cfssl newcert {r["cfssl_newcert"]:,.0f}/s',
     signing["generated"]["per_second"] / r["cfssl_newcert"], "—", None),
    ("CSR issuance (`provision --batch` with CSRs)", f'{r["fleetcert_csr"]:,.0f} certificates/s',
     f'cfssl sign {r["cfssl_sign"]:,.0f}/s', g["csr_issuance_vs_cfssl_sign"]["value"], "≥ 5×",
     g["csr_issuance_vs_cfssl_sign"]["met"]),
    ("&nbsp;&nbsp;context: CSR parse + verify + sign alone, in process",
     f'{signing["csr"]["per_second"]:,.0f}/s', f'cfssl sign {r["cfssl_sign"]:,.0f}/s',
     signing["csr"]["per_second"] / r["cfssl_sign"], "—", None),
    ("JITP first connects (201)", f'{jitp["first"]["requests_per_second"]:,.0f}/s',
     f'nginx {jitp["nginx"]["requests_per_second"]:,.0f}/s', jitp["first_vs_nginx"], "≥ 0.8×",
     jitp["first_vs_nginx"] >= 0.8),
    ("JITP returning connects (200)", f'{jitp["returning"]["requests_per_second"]:,.0f}/s',
     f'nginx {jitp["nginx"]["requests_per_second"]:,.0f}/s', jitp["returning_vs_nginx"], "≥ 1.0×",
     jitp["returning_vs_nginx"] >= 1.0),
]
print("| comparison | fleetcert | peer | ratio | goal | |")
print("|---|---:|---:|---:|---:|---|")
for name, ours, theirs, ratio, goal, ok in rows:
    ratio_text = "—" if ratio is None else (f"{ratio:,.0f}×" if ratio >= 100 else f"{ratio:.2f}×")
    print(f"| {name} | {ours} | {theirs} | {ratio_text} | {goal} | {'' if ok is None else met(ok)} |")
half = jitp["half"]
p99 = jitp["p99_at_half_ms"]
print(f'| p99 of returning connects at half of peak ({half["requests_per_second"]:,.0f}/s) | {p99:.1f} ms '
      f'| nginx {jitp["nginx_half"]["latency_ms"]["p99"]:.1f} ms | — | < 25 ms | {met(p99 < 25)} |')
idle, peak = memory["goals"]["idle_rss_under_64_mib"], memory["goals"]["peak_rss_under_256_mib"]
print(f'| `serve` peak RSS, {memory.get("connections", "1,000")} connections held / in flight | '
      f'{peak["value_mib"]:.0f} MiB | — | — | < 256 MiB | {met(peak["met"]) if peak["measured"] else "**not measured**"} |')
print(f'| `serve` idle RSS: at start / after the load | {idle["at_start_mib"]:.0f} / {idle["after_load_mib"]:.0f} MiB '
      f'| — | — | < 64 MiB | {met(idle["at_start_met"])} / {met(idle["after_load_met"])} |')
print()
problems = issuance.get("warnings", []) + [f"jitp: errors or counter mismatch in {p}" for p in jitp.get("problems", [])] \
    + memory.get("warnings", [])
for p in problems:
    print(f"- WARNING: {p}")
if problems:
    print()
for title, name in [("Issuance: fleetcert, cfssl, openssl", "issuance"),
                    ("JITP over mutual TLS: fleetcert and nginx", "jitp"),
                    ("Memory of `fleetcert serve`", "memory")]:
    print(f"## {title}")
    print()
    print(part(name))
    print()
EOF
