#!/usr/bin/env bash
# Batch provisioning throughput: generated P-256 keys, durable SQLite registry, files
# written and synced. Prints the fleetcert summary of each run as JSON.
#   usage: scripts/bench-provision.sh [DEVICES] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-50000}
runs=${2:-3}
cargo build --release --quiet -p fleetcert
bin=$PWD/target/release/fleetcert
work=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
{ echo thing_name; seq -f 'bench-device-%07g' 1 "$devices"; } > "$work/pallet.csv"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores" >&2
for run in $(seq 1 "$runs"); do
    # A fresh data and output directory per run, deleted only at the end: deleting the
    # previous run's files first would make ext4 slower at allocating inodes for this one.
    "$bin" --data-dir "$work/data-$run" ca init >/dev/null
    "$bin" --data-dir "$work/data-$run" --output json provision --batch "$work/pallet.csv" --out "$work/out-$run" \
        | tail -n 1 \
        | RUN=$run python3 -c 'import json,os,sys; s=json.load(sys.stdin); print("run %s: %d devices in %.2fs = %.0f devices/s (failed %d)" % (os.environ["RUN"], s["issued"], s["elapsed_seconds"], s["issued_per_second"], s["failed"]))'
done
