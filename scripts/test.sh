#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this):
#   - installs what the service tests need if it is missing (PostgreSQL from Debian,
#     pkilint from PyPI into a virtualenv under .ci-cache/),
#   - starts a throwaway PostgreSQL cluster on a loopback port (scripts/with-postgres.sh),
#   - checks formatting (cargo fmt --check) and lints (cargo clippy -D warnings: the
#     workspace lints in Cargo.toml, forbidden unsafe and documented public items among them),
#   - runs every test, the #[ignore]d service tests included.
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

# The mosquitto plugin's real-broker test (mosquitto-plugin/tests/real_broker.rs).
if [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_pub >/dev/null; then
    echo "test.sh: installing mosquitto and mosquitto-clients" >&2
    # The package must not start a system broker.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients >&2
fi

for tool in openssl psql; do
    command -v "$tool" >/dev/null || { echo "test.sh: $tool is required" >&2; exit 1; }
done

echo "test.sh: cargo fmt --check" >&2
cargo fmt --all --check
echo "test.sh: cargo clippy -D warnings" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings

exec scripts/with-moto.sh scripts/with-postgres.sh cargo test --workspace --locked -- --include-ignored "$@"
