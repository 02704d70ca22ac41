#!/usr/bin/env bash
# Runs a command with a throwaway moto server (a local fake of AWS IoT Core):
#
#   scripts/with-moto.sh cargo test -p fleetcert-aws -- --include-ignored
#
# Installs moto[server] into a virtualenv at .ci-cache/moto (relative to the repository root)
# if .ci-cache/moto/bin/moto_server is missing, starts it on a free loopback port with its log
# in a temporary directory, waits (at most 30 s) until it answers, and exports for the command:
#
#   FLEETCERT_TEST_MOTO_URL=http://127.0.0.1:PORT  the endpoint URL of that server
#   FLEETCERT_TEST_MOTO_BIN=/abs/path/moto_server  a moto_server (same arguments: -H HOST -p PORT)
#                                                 for tests that start and kill their own servers
#   FLEETCERT_TEST_MOTO_DEFAULT_BIN=/abs/path      moto_server as installed, default settings
#                                                 (certificate ids = SHA-256 of the PEM text), for
#                                                 the tests that the mirror works against moto and
#                                                 LocalStack as they come
#   AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true
#
# moto computes certificate ids as SHA-256 of the PEM text unless its `iot.use_valid_cert`
# option is on; real AWS uses SHA-256 of the DER. moto 5.x's /moto-api/config endpoint ignores
# the "iot" section, so the server is started through a small launcher that switches the option
# on in-process before starting moto (FLEETCERT_TEST_MOTO_BIN is that launcher too). fleetcert
# itself never relies on it: it uses the ids the service returns (tests run both ways).
#
# Runs the command (not exec, so the trap can stop moto afterwards), always stops moto and
# removes the temporary directory, and exits with the command's status.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.ci-cache/moto

for tool in python3 curl; do
    command -v "$tool" >/dev/null || { echo "with-moto: $tool is required" >&2; exit 1; }
done

if [[ ! -x $VENV/bin/moto_server ]]; then
    echo "with-moto: installing moto[server] into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]' >&2
fi

DIR=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-moto.XXXXXX")
LOG=$DIR/moto.log
PID=

cleanup() {
    local rc=$?
    if [[ -n $PID ]]; then
        kill "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf "$DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# moto_server with certificate ids computed from the DER, as AWS does.
BIN=$DIR/moto_server
cat >"$BIN" <<EOF
#!/bin/sh
exec "$VENV/bin/python3" -c '
import sys
from moto.core.config import default_user_config
default_user_config.setdefault("iot", {})["use_valid_cert"] = True
from moto.server import main
sys.exit(main(sys.argv[1:]))
' "\$@"
EOF
chmod 755 "$BIN"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Starts moto on a fresh port; returns non-zero if it died or did not answer within 30 s.
start_moto() {
    PORT=$(free_port)
    "$BIN" -H 127.0.0.1 -p "$PORT" >"$LOG" 2>&1 &
    PID=$!
    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        if curl -sf -o /dev/null "http://127.0.0.1:$PORT/moto-api/data.json"; then
            return 0
        fi
        if ! kill -0 "$PID" 2>/dev/null; then
            wait "$PID" 2>/dev/null || true
            PID=
            return 1
        fi
        sleep 0.2
    done
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=
    return 1
}

started=
for _ in 1 2 3; do
    # Another process may grab the port between free_port and moto binding it: try again.
    if start_moto; then
        started=1
        break
    fi
done
if [[ -z $started ]]; then
    echo "with-moto: could not start moto; last log lines:" >&2
    tail -n 20 "$LOG" >&2 || true
    exit 1
fi

export FLEETCERT_TEST_MOTO_URL="http://127.0.0.1:$PORT"
export FLEETCERT_TEST_MOTO_BIN=$BIN
export FLEETCERT_TEST_MOTO_DEFAULT_BIN=$VENV/bin/moto_server
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_EC2_METADATA_DISABLED=true
echo "with-moto: moto $("$VENV/bin/python3" -c 'import moto; print(moto.__version__)') running on 127.0.0.1:$PORT, log in $LOG" >&2
echo "with-moto: FLEETCERT_TEST_MOTO_URL=$FLEETCERT_TEST_MOTO_URL" >&2

set +e
"$@"
rc=$?
set -e
exit "$rc"
