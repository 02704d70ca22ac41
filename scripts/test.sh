#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this):
#   - installs what the service tests need if it is missing (PostgreSQL from Debian,
#     pkilint from PyPI into a virtualenv under .ci-cache/),
#   - starts a throwaway PostgreSQL cluster on a loopback port (scripts/with-postgres.sh),
#     a moto server (scripts/with-moto.sh), and installs mosquitto and paho-mqtt for the
#     MQTT tests, which start their own brokers (scripts/with-mosquitto.sh),
#   - checks formatting (cargo fmt --check) and lints (cargo clippy -D warnings: the
#     workspace lints in Cargo.toml, forbidden unsafe and documented public items among them),
#   - runs every test, the #[ignore]d service tests included; a failing test binary does
#     not stop the others (--no-fail-fast), so one run shows every failure.
# Plain `cargo test` runs only the hermetic tests.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.ci-cache/venv
if [ ! -x "$venv/bin/lint_pkix_cert" ]; then
    echo "test.sh: installing pkilint into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check pkilint
fi
export FLEETCERT_PKILINT="$PWD/$venv/bin/lint_pkix_cert"

for tool in openssl psql; do
    command -v "$tool" >/dev/null || { echo "test.sh: $tool is required" >&2; exit 1; }
done

echo "test.sh: cargo fmt --check" >&2
cargo fmt --all --check
echo "test.sh: cargo clippy -D warnings" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings

exec scripts/with-moto.sh scripts/with-postgres.sh scripts/with-mosquitto.sh cargo test --workspace --locked --no-fail-fast -- --include-ignored "$@"
