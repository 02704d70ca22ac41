#!/usr/bin/env bash
# Certificate issuance: fleetcert against cfssl and an openssl command-line script,
# same machine, same run, same issuing CA.
#
#   usage: bench/compare-issuance.sh [DEVICES] [SECONDS]     (20000 10)
#
# 1. Release builds of fleetcert and fleetcert-bench.
# 2. fleetcert, generated keys: a fresh data directory (`ca init`, P-256), then
#    `provision --batch` of DEVICES new things (durable SQLite, key + certificate files);
#    then the same into a second fresh data directory with `--pallet` (one JSON-lines file).
# 3. cfssl 1.2.0 (`cfssl serve`, no database; and again with its SQLite certdb,
#    `-db-config`, step 5b: the same work as fleetcert's registry) with fleetcert's issuing CA certificate and
#    key: `/api/v1/cfssl/newcert` (cfssl generates a P-256 key and signs) driven by wrk
#    for SECONDS (bench/wrk/newcert.lua), after one request checked with curl + openssl.
# 4. A naive factory script: per device `openssl ecparam -genkey`, `openssl req -new`,
#    `openssl x509 -req` with the same CA, sequential, OPENSSL_DEVICES devices (200).
# 5. CSRs: `fleetcert-bench csrs` makes DEVICES P-256 keys + CSRs (not timed); a second
#    fresh data directory and `provision --batch` of those CSRs; cfssl `/api/v1/cfssl/sign`
#    driven by wrk with the first SIGN_CSRS (500) of the same CSRs (bench/wrk/sign.lua).
# 6. Where the time goes (context, not goals): (a) again with the device files on tmpfs
#    (/dev/shm; the registry stays on disk), and `fleetcert-bench issuance` (signing
#    alone, in process, against ring's floor).
# 7. A markdown table on stdout (progress on stderr); SUMMARY_JSON=FILE also writes every
#    figure as one JSON object; KEEP_WORK=1 keeps the temp dir.
#
# fleetcert rows are timed as whole commands (process start to exit: CSV and CSR files
# read, CSR signatures checked, CA loaded, registry opened, every certificate committed
# and its files written and synced); fleetcert's own figure (`issued_per_second`, which
# starts after the CSRs are read and checked) is shown next to it. cfssl rows are
# answers with HTTP 2xx and `"success":true` per second, as counted by wrk's Lua hooks.
# wrk and the servers share the same cores. Everything listens on 127.0.0.1 and every
# process started here is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

usage() { echo "usage: bench/compare-issuance.sh [DEVICES] [SECONDS]     (defaults: 20000 10)" >&2; }
note() { echo "compare-issuance: $*" >&2; }
die() { note "$*"; exit 1; }

case "${1:-}" in -h | --help) usage; exit 0 ;; esac
if [ $# -gt 2 ]; then usage; exit 2; fi
devices=${1:-20000}
seconds=${2:-10}
openssl_devices=${OPENSSL_DEVICES:-200}
sign_csrs_max=${SIGN_CSRS:-500}
wrk_threads=2
wrk_connections=8
positive() { [[ $2 =~ ^[1-9][0-9]*$ ]] || { note "$1 must be a positive integer, not '$2'"; usage; exit 2; }; }
positive DEVICES "$devices"
positive SECONDS "$seconds"
positive OPENSSL_DEVICES "$openssl_devices"
positive SIGN_CSRS "$sign_csrs_max"
if [ "${#devices}" -gt 7 ]; then note "DEVICES must be at most 9999999"; exit 2; fi
if [ "$seconds" -gt 3600 ]; then note "SECONDS must be at most 3600"; exit 2; fi
for tool in cfssl wrk openssl curl python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (Debian: golang-cfssl, wrk, openssl, curl, python3)"
done
# The environment must not point fleetcert at another database or encrypt the CA key
# (cfssl is handed the issuing key file as it is).
unset FLEETCERT_DATA_DIR FLEETCERT_DATABASE_URL FLEETCERT_CA_PASSPHRASE

note "building release binaries"
cargo build --release --quiet -p fleetcert -p fleetcert-bench
fleetcert=$PWD/target/release/fleetcert
bench=$PWD/target/release/fleetcert-bench
wrkdir=$PWD/bench/wrk

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-compare-issuance.XXXXXX")
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        pkill -P "$p" 2>/dev/null || true # children of a background subshell
        kill "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    if [ -n "${tmpfs_dir:-}" ]; then rm -rf "$tmpfs_dir"; fi
    if [ "${KEEP_WORK:-0}" = 1 ]; then note "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs a command in the background and waits for it, so that the cleanup trap can kill
# it when the script is interrupted. Keeps the command's exit status.
run() {
    "$@" &
    local p=$! rc=0
    pids+=("$p")
    wait "$p" || rc=$?
    unset 'pids[-1]' # reaped: its id may be reused, so cleanup must not signal it
    return "$rc"
}

now() { echo "$EPOCHREALTIME"; }
elapsed() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.6f}")' "$1" "$2"; }

port_cfssl=$(free_ports 1)

# `fleetcert provision --batch` into a fresh data directory, timed as a whole command.
# Writes NAME.json: fleetcert's summary line + wall-clock seconds + file counts.
provision_timed() { # NAME PALLET EXPECT_KEYS(0|1) [OUT_BASE] [files|pallet]
    local name=$1 pallet=$2 expect_keys=$3 base=${4:-}
    local data=$work/data-$name out=${base:-$work}/out-$name output=${5:-files}
    local target=(--out "$out")
    if [ "$output" = pallet ]; then target=(--pallet "$out/devices.jsonl"); fi
    "$fleetcert" --data-dir "$data" ca init --key-algorithm p256 >/dev/null
    # Flush what earlier steps left dirty (the build, the CSR files): fleetcert syncs its
    # file system per group and would otherwise pay for writing them back.
    sync
    local t0 t1
    t0=$(now)
    # `fleetcert-bench csrs` names each CSR by its absolute path.
    run "$fleetcert" --data-dir "$data" --output json provision --batch "$pallet" "${target[@]}" \
        --allow-absolute-csr-paths >"$work/provision-$name.jsonl" 2>"$work/provision-$name.err" \
        || { tail -n 5 "$work/provision-$name.err" >&2; die "fleetcert provision ($name) failed"; }
    t1=$(now)
    tail -n 1 "$work/provision-$name.jsonl" >"$work/provision-$name.summary.json"
    local crt key
    if [ "$output" = pallet ]; then
        # One line per device after the header; each certificate goes to a file here,
        # after the clock stopped, for the checks below.
        read -r crt key < <(python3 -c '
import json, os, sys
path, out = sys.argv[1:]
lines = open(path).read().splitlines()
assert json.loads(lines[0])["fleetcert_pallet"] == 1, "no pallet header"
crt = key = 0
for line in lines[1:]:
    d = json.loads(line)
    open(os.path.join(out, d["thing_name"] + ".crt"), "w").write(d["certificate"])
    crt += 1
    key += "private_key" in d
print(crt, key)' "$out/devices.jsonl" "$out")
    else
        crt=$(find "$out" -maxdepth 1 -name '*.crt' | wc -l)
        key=$(find "$out" -maxdepth 1 -name '*.key' | wc -l)
    fi
    python3 - "$work/provision-$name.summary.json" "$(elapsed "$t0" "$t1")" "$crt" "$key" \
        "$devices" "$expect_keys" >"$work/$name.json" <<'EOF'
import json, sys
path, wall, crt, key, devices, expect_keys = sys.argv[1:]
s = json.load(open(path))
wall, crt, key, devices = float(wall), int(crt), int(key), int(devices)
problems = []
if s.get("failed") != 0:
    problems.append(f'failed = {s.get("failed")}')
if s.get("issued") != devices:
    problems.append(f'issued = {s.get("issued")}, expected {devices}')
if crt != devices:
    problems.append(f"{crt} .crt files, expected {devices}")
if key != (devices if expect_keys == "1" else 0):
    problems.append(f"{key} .key files")
print(json.dumps({
    "issued": s.get("issued"), "failed": s.get("failed"),
    "skipped": s.get("skipped"), "redelivered": s.get("redelivered"),
    "fleetcert_elapsed_seconds": s.get("elapsed_seconds"),
    "fleetcert_issued_per_second": s.get("issued_per_second"),
    "wall_seconds": wall, "per_second": s.get("issued", 0) / wall,
    "crt_files": crt, "key_files": key, "problems": problems,
}))
EOF
    local problems
    problems=$(python3 -c 'import json,sys; print("; ".join(json.load(open(sys.argv[1]))["problems"]))' "$work/$name.json")
    [ -z "$problems" ] || die "fleetcert provision ($name): $problems"
    # A sample of the certificates chains to the root (first, middle, last).
    local sample=() i
    for i in 1 $(((devices + 1) / 2)) "$devices"; do
        sample+=("$out/$(sed -n "$((i + 1))p" "$pallet" | cut -d, -f1).crt")
    done
    openssl verify -CAfile "$data/ca/root.crt" -untrusted "$data/ca/issuing.crt" "${sample[@]}" \
        >"$work/verify-$name.txt" 2>&1 \
        || { cat "$work/verify-$name.txt" >&2; die "fleetcert certificates ($name) do not verify"; }
}

# wrk against cfssl; writes NAME.json (the Lua done() hook's WRK_SUMMARY line).
wrk_timed() { # NAME SCRIPT URL [-- SCRIPT ARGS]
    local name=$1 script=$2 url=$3
    shift 3
    run wrk -t"$wrk_threads" -c"$wrk_connections" -d"${seconds}s" --timeout 10s \
        -s "$script" "$url" "$@" >"$work/wrk-$name.txt" 2>&1 \
        || { cat "$work/wrk-$name.txt" >&2; die "wrk ($name) failed"; }
    sed -n 's/^WRK_SUMMARY //p' "$work/wrk-$name.txt" >"$work/$name.json"
    if ! python3 -c 'import json,sys; json.load(open(sys.argv[1]))["ok"]' "$work/$name.json" 2>/dev/null; then
        cat "$work/wrk-$name.txt" >&2
        die "wrk ($name) printed no WRK_SUMMARY line"
    fi
}

# One cfssl answer checked by hand: HTTP 200, "success":true, and a certificate that
# chains to fleetcert's root through the issuing CA, with the expected CN and key.
check_cfssl_answer() { # NAME ENDPOINT BODY_FILE EXPECTED_CN [CSR_FILE]
    local name=$1 endpoint=$2 body=$3 cn=$4 csr=${5:-}
    local code
    code=$(curl -sS -o "$work/check-$name.json" -w '%{http_code}' -X POST \
        -H 'Content-Type: application/json' --data-binary "@$body" \
        "http://127.0.0.1:$port_cfssl/api/v1/cfssl/$endpoint") || die "curl to cfssl $endpoint failed"
    [ "$code" = 200 ] || { cat "$work/check-$name.json" >&2; die "cfssl $endpoint answered HTTP $code"; }
    python3 - "$work/check-$name.json" "$work/check-$name.crt" <<'EOF' || die "cfssl $endpoint: bad answer"
import json, sys
answer = json.load(open(sys.argv[1]))
if answer.get("success") is not True:
    sys.exit(f"not a success: {answer.get('errors')}")
result = answer["result"]
cert = result if isinstance(result, str) else result.get("certificate")
if not cert or "BEGIN CERTIFICATE" not in cert:
    sys.exit("no certificate in the answer")
open(sys.argv[2], "w").write(cert)
EOF
    openssl verify -CAfile "$ca/root.crt" -untrusted "$ca/issuing.crt" "$work/check-$name.crt" \
        >"$work/verify-check-$name.txt" 2>&1 \
        || { cat "$work/verify-check-$name.txt" >&2; die "cfssl $endpoint: the certificate does not verify against fleetcert's CA"; }
    local subject text
    subject=$(openssl x509 -in "$work/check-$name.crt" -noout -subject -nameopt RFC2253)
    [ "$subject" = "subject=CN=$cn" ] || die "cfssl $endpoint: subject '$subject', expected CN=$cn"
    text=$(openssl x509 -in "$work/check-$name.crt" -noout -text)
    [[ $text == *"ASN1 OID: prime256v1"* ]] || die "cfssl $endpoint: the certificate's key is not P-256"
    if [ -n "$csr" ]; then
        cmp -s <(openssl req -in "$csr" -noout -pubkey) <(openssl x509 -in "$work/check-$name.crt" -noout -pubkey) \
            || die "cfssl $endpoint: the certificate's key is not the CSR's"
    fi
}

note "work dir $work"

# --- (a) fleetcert, generated keys ---------------------------------------------------
{ echo thing_name; seq -f 'gen-device-%07g' 1 "$devices"; } >"$work/pallet.csv"
note "fleetcert: provision --batch, $devices generated P-256 keys"
provision_timed gen "$work/pallet.csv" 1
ca=$work/data-gen/ca # the issuing CA every peer uses
note "fleetcert: provision --batch --pallet, $devices generated P-256 keys (one JSON-lines file)"
provision_timed pallet "$work/pallet.csv" 1 "" pallet

# --- cfssl serve with fleetcert's issuing CA ------------------------------------------
# cfssl 1.2.0 reads the unencrypted PKCS#8 "PRIVATE KEY" PEM fleetcert writes as it is;
# any other form is converted to SEC1 ("EC PRIVATE KEY") in the work dir first.
ca_key=$ca/issuing.key
if ! grep -q -- '-----BEGIN PRIVATE KEY-----' "$ca_key" \
    && ! grep -q -- '-----BEGIN EC PRIVATE KEY-----' "$ca_key"; then
    openssl pkey -traditional -in "$ca_key" -out "$work/issuing-key.pem" || die "cannot convert the issuing key"
    chmod 600 "$work/issuing-key.pem"
    ca_key=$work/issuing-key.pem
fi
# The device profile: digital signature + client auth, one year (fleetcert's default).
cat >"$work/cfssl-config.json" <<'EOF'
{"signing": {"default": {"usages": ["digital signature", "client auth"], "expiry": "8760h"}}}
EOF
# -loglevel 2 (warnings): cfssl otherwise logs five INFO lines per request.
cfssl serve -address 127.0.0.1 -port "$port_cfssl" -ca "$ca/issuing.crt" -ca-key "$ca_key" \
    -config "$work/cfssl-config.json" -loglevel 2 >"$work/cfssl.log" 2>&1 &
cfssl_pid=$!
pids+=("$cfssl_pid")
wait_for_port "$port_cfssl" "cfssl serve" "$cfssl_pid" || { cat "$work/cfssl.log" >&2; exit 1; }
cfssl_url=http://127.0.0.1:$port_cfssl/api/v1/cfssl

# --- (b) cfssl newcert ---------------------------------------------------------------
echo '{"request":{"CN":"device-check","key":{"algo":"ecdsa","size":256}}}' >"$work/newcert-check.json"
check_cfssl_answer newcert newcert "$work/newcert-check.json" device-check
note "cfssl: /api/v1/cfssl/newcert, wrk -t$wrk_threads -c$wrk_connections, ${seconds}s"
wrk_timed newcert "$wrkdir/newcert.lua" "$cfssl_url/newcert"

# --- (c) openssl command-line script ---------------------------------------------------
cat >"$work/device-ext.cnf" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
ossl=$work/out-openssl
mkdir -p "$ossl"
note "openssl: $openssl_devices devices, ecparam + req + x509 -req each, sequential"
openssl_script() {
    umask 077
    local i name
    for i in $(seq -f '%07g' 1 "$openssl_devices"); do
        name=ossl-device-$i
        openssl ecparam -genkey -name prime256v1 -noout -out "$ossl/$name.key" 2>>"$work/openssl.log" || return
        openssl req -new -key "$ossl/$name.key" -subj "/CN=$name" -out "$ossl/$name.csr" 2>>"$work/openssl.log" || return
        openssl x509 -req -in "$ossl/$name.csr" -CA "$ca/issuing.crt" -CAkey "$ca_key" \
            -days 365 -sha256 -extfile "$work/device-ext.cnf" -out "$ossl/$name.crt" 2>>"$work/openssl.log" || return
    done
}
t0=$(now)
run openssl_script || { tail -n 5 "$work/openssl.log" >&2; die "the openssl script failed"; }
t1=$(now)
openssl_seconds=$(elapsed "$t0" "$t1")
openssl_crt=$(find "$ossl" -maxdepth 1 -name '*.crt' | wc -l)
[ "$openssl_crt" = "$openssl_devices" ] || die "openssl script: $openssl_crt certificates, expected $openssl_devices"
openssl verify -CAfile "$ca/root.crt" -untrusted "$ca/issuing.crt" "$ossl"/*.crt >"$work/verify-openssl.txt" 2>&1 \
    || { grep -v ': OK$' "$work/verify-openssl.txt" >&2; die "openssl script: certificates do not verify"; }
openssl_serials=$(for f in "$ossl"/*.crt; do openssl x509 -in "$f" -noout -serial; done | sort -u | wc -l)
[ "$openssl_serials" = "$openssl_devices" ] || die "openssl script: serial numbers repeat"

# --- (d) CSRs: fleetcert provision --batch, cfssl sign ------------------------------------
note "generating $devices P-256 CSRs (not timed)"
run "$bench" csrs --count "$devices" --out "$work/csrs" --prefix csr-device \
    --pallet "$work/csr-pallet.csv" >"$work/csrs.json"
note "fleetcert: provision --batch, $devices CSRs"
provision_timed csr "$work/csr-pallet.csv" 0
# The certificate has the CSR's key.
cmp -s <(openssl req -in "$work/csrs/csr-device-0000001.csr" -noout -pubkey) \
    <(openssl x509 -in "$work/out-csr/csr-device-0000001.crt" -noout -pubkey) \
    || die "fleetcert: csr-device-0000001.crt does not carry its CSR's key"

sign_csrs=$((devices < sign_csrs_max ? devices : sign_csrs_max))
python3 - "$work/csrs" "$sign_csrs" "$work/sign-bodies.jsonl" "$work/sign-check.json" <<'EOF'
import json, os, sys
csrs, count, bodies, check = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
names = sorted(n for n in os.listdir(csrs) if n.endswith(".csr"))[:count]
with open(bodies, "w") as out:
    for n in names:
        # json.dumps escapes the PEM's newlines: one request body per line.
        out.write(json.dumps({"certificate_request": open(os.path.join(csrs, n)).read()}) + "\n")
with open(check, "w") as out:
    out.write(json.dumps({"certificate_request": open(os.path.join(csrs, names[0])).read()}))
EOF
check_cfssl_answer sign sign "$work/sign-check.json" csr-device-0000001 "$work/csrs/csr-device-0000001.csr"
note "cfssl: /api/v1/cfssl/sign ($sign_csrs CSRs in turn), wrk -t$wrk_threads -c$wrk_connections, ${seconds}s"
wrk_timed sign "$wrkdir/sign.lua" "$cfssl_url/sign" -- "$work/sign-bodies.jsonl"

# --- (d2) cfssl newcert with its certificate database: the same work --------------------
# cfssl's `serve` without a database keeps nothing; a cfssl user who needs a registry (or
# CRLs, OCSP) gives it `-db-config`, and every certificate it issues is then inserted in
# its certdb before the answer. SQLite, as fleetcert's default: the `certificates` and
# `ocsp_responses` tables of cfssl's certdb (as its certdb/sqlite migration creates them;
# Debian ships no migration files, so they are created here with python3's sqlite3).
cfssl_rss=$(awk '/VmHWM/ {print $2}' "/proc/$cfssl_pid/status" 2>/dev/null || echo 0)
kill "$cfssl_pid" 2>/dev/null || true
wait "$cfssl_pid" 2>/dev/null || true
certdb=$work/cfssl-certdb.sqlite
python3 - "$certdb" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.executescript("""
CREATE TABLE certificates (
  serial_number blob NOT NULL, authority_key_identifier blob NOT NULL, ca_label blob,
  status blob NOT NULL, reason int, expiry timestamp, revoked_at timestamp, pem blob NOT NULL,
  PRIMARY KEY (serial_number, authority_key_identifier));
CREATE TABLE ocsp_responses (
  serial_number blob NOT NULL, authority_key_identifier blob NOT NULL, body blob NOT NULL,
  expiry timestamp, PRIMARY KEY (serial_number, authority_key_identifier));
""")
db.close()
PY
printf '{"driver": "sqlite3", "data_source": "%s"}\n' "$certdb" >"$work/cfssl-db.json"
cfssl serve -address 127.0.0.1 -port "$port_cfssl" -ca "$ca/issuing.crt" -ca-key "$ca_key" \
    -config "$work/cfssl-config.json" -db-config "$work/cfssl-db.json" -loglevel 2 \
    >"$work/cfssl-certdb.log" 2>&1 &
cfssl_pid=$!
pids+=("$cfssl_pid")
wait_for_port "$port_cfssl" "cfssl serve (certdb)" "$cfssl_pid" || { cat "$work/cfssl-certdb.log" >&2; exit 1; }
check_cfssl_answer newcert-certdb newcert "$work/newcert-check.json" device-check
note "cfssl with its SQLite certdb: /api/v1/cfssl/newcert, wrk -t$wrk_threads -c$wrk_connections, ${seconds}s"
wrk_timed newcert_certdb "$wrkdir/newcert.lua" "$cfssl_url/newcert"
certdb_rows=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from certificates").fetchone()[0])' "$certdb")
echo "$certdb_rows" >"$work/certdb-rows.txt"

# --- (e) where fleetcert's time goes -------------------------------------------------------
# The same generated-keys run with the device files on tmpfs (the registry stays durable on
# disk): the difference to (a) is the disk file system's cost of creating, syncing and
# renaming two files per device. And the signing alone, in process, against ring's floor.
tmpfs_dir=
if [ "$(stat -f -c %T /dev/shm 2>/dev/null)" = tmpfs ] && [ -w /dev/shm ]; then
    tmpfs_dir=$(mktemp -d /dev/shm/fleetcert-compare-issuance.XXXXXX)
    note "fleetcert: provision --batch, $devices generated keys, device files on tmpfs ($tmpfs_dir)"
    provision_timed tmpfs "$work/pallet.csv" 1 "$tmpfs_dir"
    rm -rf "$tmpfs_dir"
    tmpfs_dir=
else
    note "no writable tmpfs at /dev/shm: skipping the files-on-tmpfs run"
    echo null >"$work/tmpfs.json"
fi
note "fleetcert-bench issuance: signing alone, in process ($devices of each kind, best of 3)"
run "$bench" issuance --devices "$devices" --rounds 3 --quiet >"$work/inprocess.json"

cfssl_version=$(cfssl version 2>/dev/null | awk -F': ' '/^Version/ {v=$2} /^Runtime/ {r=$2} END {print v " (" r ")"}')
openssl_version=$(openssl version | awk '{print $1 " " $2}')
wrk_version=$( (wrk -v 2>&1 || true) | awk 'NR == 1 {print $2}') # wrk -v exits 1

# --- report ---------------------------------------------------------------------------
python3 - "$work" "$devices" "$seconds" "$openssl_devices" "$openssl_seconds" "$sign_csrs" \
    "$wrk_threads" "$wrk_connections" "$cfssl_version" "$openssl_version" "$wrk_version" \
    "$cfssl_rss" "${SUMMARY_JSON:-}" <<'EOF'
import json, os, platform, sys
(work, devices, seconds, openssl_devices, openssl_seconds, sign_csrs, wrk_t, wrk_c,
 cfssl_version, openssl_version, wrk_version, cfssl_rss, summary_path) = sys.argv[1:]
devices, seconds, openssl_devices, sign_csrs = int(devices), int(seconds), int(openssl_devices), int(sign_csrs)
openssl_seconds = float(openssl_seconds)
load = lambda name: json.load(open(os.path.join(work, name + ".json")))
gen, csr, newcert, sign = load("gen"), load("csr"), load("newcert"), load("sign")
pallet = load("pallet")
newcert_db = load("newcert_certdb")
certdb_rows = int(open(os.path.join(work, "certdb-rows.txt")).read())
tmpfs, inprocess = load("tmpfs"), load("inprocess")
openssl_rate = openssl_devices / openssl_seconds

def wrk_problems(w):
    p = []
    if w["non_2xx"]: p.append(f'{w["non_2xx"]:,} non-2xx')
    if w["not_success"]: p.append(f'{w["not_success"]:,} 2xx without "success":true')
    errs = {k: v for k, v in w["socket_errors"].items() if v}
    if errs: p.append("socket errors " + ", ".join(f"{k} {v}" for k, v in errs.items()))
    if w["ok"] != w["requests"]: p.append(f'ok {w["ok"]:,} ≠ requests {w["requests"]:,}')
    if w["ok"] == 0: p.append("no successful answers")
    return p

ref_newcert, ref_sign = newcert["ok_per_second"], sign["ok_per_second"]
ref_newcert_db = newcert_db["ok_per_second"]
ratio = lambda a, b: a / b if b else None  # None: the reference row had no successes
x = lambda v, digits=2: "—" if v is None else f"{v:.{digits}f}×"
r_gen = ratio(gen["per_second"], ref_newcert)
r_gen_db = ratio(gen["per_second"], ref_newcert_db)
r_pallet_db = ratio(pallet["per_second"], ref_newcert_db)
r_csr = ratio(csr["per_second"], ref_sign)
r_sign = ratio(ref_sign, ref_newcert)
r_openssl = ratio(openssl_rate, ref_newcert)

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
load1 = open("/proc/loadavg").read().split()[0]
print(f"Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()} "
      f"(1-min load average at the end: {load1}); cfssl {cfssl_version}; {openssl_version}; wrk {wrk_version}. "
      "Everything on the same cores, 127.0.0.1.")
print()
print(f"{devices:,} devices per fleetcert run (P-256, durable SQLite, files written); cfssl: "
      f"wrk -t{wrk_t} -c{wrk_c} for {seconds} s per endpoint, without and with its SQLite certdb; openssl: {openssl_devices} devices "
      "in a sequential shell loop. All sign with the same kind of P-256 issuing CA "
      "(cfssl and openssl with the very key of the generated-keys run).")
print()
print("| measurement | rate/s | ratio | counted |")
print("|---|---:|---:|---|")
def fc_counted(r):
    return (f'{r["issued"]:,} issued, {r["failed"]} failed, {r["crt_files"]:,} .crt + {r["key_files"]:,} .key files, '
            f'{r["wall_seconds"]:.2f} s whole command (fleetcert\'s own figure after reading its input: '
            f'{r["fleetcert_issued_per_second"]:,.0f}/s in {r["fleetcert_elapsed_seconds"]:.2f} s)')
def wrk_counted(w):
    l = w["latency_ms"]
    p = wrk_problems(w)
    flag = ("; **WARNING: " + "; ".join(p) + "**") if p else "; 0 non-2xx, 0 socket errors"
    return (f'{w["ok"]:,} answers 2xx + "success":true in {w["duration_s"]:.2f} s; '
            f'p50 {l["p50"]:.1f} ms, p99 {l["p99"]:.1f} ms{flag}')
print(f'| fleetcert `provision --batch`, generated keys | {gen["per_second"]:,.0f} | {x(r_gen)} cfssl newcert | {fc_counted(gen)} |')
print(f'| fleetcert `provision --batch --pallet`, generated keys (one JSON-lines file) | {pallet["per_second"]:,.0f} '
      f'| {x(ratio(pallet["per_second"], ref_newcert))} cfssl newcert | {fc_counted(pallet).replace(" .crt + ", " certificates + ").replace(" .key files", " keys in the pallet")} |')
print(f'| cfssl `/api/v1/cfssl/newcert` (cfssl generates the key), no database | {ref_newcert:,.0f} | — | {wrk_counted(newcert)} |')
print(f'| cfssl `/api/v1/cfssl/newcert` with its SQLite certdb (the same work: every certificate recorded) '
      f'| {ref_newcert_db:,.0f} | fleetcert {x(r_gen_db)} (files), {x(r_pallet_db)} (pallet) | {wrk_counted(newcert_db)}; {certdb_rows:,} rows in the certdb '
      f'(the check answer included) |')
print(f'| openssl ecparam + req + x509 -req, sequential script | {openssl_rate:,.1f} | {x(r_openssl, 3)} cfssl newcert | '
      f'{openssl_devices} devices in {openssl_seconds:.2f} s, all verified, serials distinct |')
print(f'| fleetcert `provision --batch`, device CSRs | {csr["per_second"]:,.0f} | {x(r_csr)} cfssl sign | {fc_counted(csr)} |')
print(f'| cfssl `/api/v1/cfssl/sign` ({sign_csrs} CSRs in turn) | {ref_sign:,.0f} | {x(r_sign)} cfssl newcert | {wrk_counted(sign)} |')
print()
print("Where fleetcert's time goes (same run; not the goals' figures):")
print()
print("| measurement | rate/s | ratio | counted |")
print("|---|---:|---:|---|")
if tmpfs:
    print(f'| fleetcert `provision --batch`, generated keys, device files on tmpfs (registry durable on disk) '
          f'| {tmpfs["per_second"]:,.0f} | {x(ratio(tmpfs["per_second"], ref_newcert))} cfssl newcert | {fc_counted(tmpfs)} |')
ig, ic = inprocess["generated"]["per_second"], inprocess["csr"]["per_second"]
print(f'| signing alone, in process: key generation + certificate (`fleetcert-bench issuance`) | {ig:,.0f} '
      f'| {x(ratio(ig, ref_newcert))} cfssl newcert | best of {inprocess["rounds"]} rounds on {inprocess["threads"]} threads; '
      f'ring floor {inprocess["floor_keygen_sign"]["per_second"]:,.0f}/s ({inprocess["ratio_generated_to_floor"]:.2f}×) |')
print(f'| signing alone, in process: CSR parse + verify + certificate | {ic:,.0f} | {x(ratio(ic, ref_sign))} cfssl sign '
      f'| ring floor {inprocess["floor_verify_sign"]["per_second"]:,.0f}/s ({inprocess["ratio_csr_to_floor"]:.2f}×) |')
print()
goals = [("batch_provisioning_vs_cfssl_newcert", "batch provisioning ≥ 8× cfssl newcert", r_gen, 8.0),
         ("batch_provisioning_vs_cfssl_newcert_certdb", "batch provisioning ≥ 8× cfssl newcert with its certdb (same work), device files", r_gen_db, 8.0),
         ("batch_provisioning_pallet_vs_cfssl_newcert_certdb", "batch provisioning ≥ 8× cfssl newcert with its certdb (same work), --pallet", r_pallet_db, 8.0),
         ("csr_issuance_vs_cfssl_sign", "CSR issuance ≥ 5× cfssl sign", r_csr, 5.0)]
for _, name, value, want in goals:
    print(f'- {name}: {x(value)} — {"met" if value is not None and value >= want else "not met"}')
bad = [f"cfssl {n}: " + "; ".join(wrk_problems(w)) for n, w in [("newcert", newcert), ("newcert with certdb", newcert_db), ("sign", sign)] if wrk_problems(w)]
# Every answered certificate is in the certdb (plus the check answer; a request cut off at
# the end of the run may have been recorded without being counted).
if not newcert_db["ok"] + 1 <= certdb_rows <= newcert_db["requests"] + 1 + int(wrk_c):
    bad.append(f'cfssl certdb holds {certdb_rows:,} rows for {newcert_db["ok"]:,} answers')
for b in bad:
    print(f"- WARNING: {b} — that row's figure is not a clean success rate")
print(f"- cfssl serve peak RSS (VmHWM): {int(cfssl_rss) / 1024:.0f} MiB")

if summary_path:
    summary = {
        "devices": devices, "seconds": seconds,
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "load1_at_end": float(load1)},
        "versions": {"cfssl": cfssl_version, "openssl": openssl_version, "wrk": wrk_version},
        "wrk": {"threads": int(wrk_t), "connections": int(wrk_c)},
        "fleetcert_generated": gen,
        "fleetcert_generated_pallet": pallet,
        "fleetcert_csr": csr,
        "cfssl_newcert": newcert,
        "cfssl_newcert_certdb": dict(newcert_db, certdb_rows=certdb_rows),
        "cfssl_sign": dict(sign, csrs_cycled=sign_csrs),
        "openssl_script": {"devices": openssl_devices, "seconds": openssl_seconds, "per_second": openssl_rate},
        "fleetcert_generated_files_on_tmpfs": tmpfs,
        "in_process_signing": inprocess,
        "rates": {"fleetcert_generated": gen["per_second"], "fleetcert_generated_pallet": pallet["per_second"], "fleetcert_csr": csr["per_second"],
                  "cfssl_newcert": ref_newcert, "cfssl_sign": ref_sign, "openssl_script": openssl_rate},
        "ratios": {"fleetcert_generated_vs_cfssl_newcert": r_gen,
                   "fleetcert_generated_vs_cfssl_newcert_certdb": r_gen_db,
                   "fleetcert_pallet_vs_cfssl_newcert_certdb": r_pallet_db, "fleetcert_csr_vs_cfssl_sign": r_csr,
                   "cfssl_sign_vs_cfssl_newcert": r_sign, "openssl_script_vs_cfssl_newcert": r_openssl},
        "goals": {key: {"label": name, "value": value, "want": want, "met": value is not None and value >= want}
                  for key, name, value, want in goals},
        "wrk_non_2xx": {"newcert": newcert["non_2xx"], "newcert_certdb": newcert_db["non_2xx"], "sign": sign["non_2xx"]},
        "warnings": bad,
        "cfssl_peak_rss_kib": int(cfssl_rss),
    }
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
EOF
