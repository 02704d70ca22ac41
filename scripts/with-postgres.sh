#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL cluster:
#
#   scripts/with-postgres.sh cargo test -p fleetcert-registry -- --include-ignored
#
# Starts a fresh cluster (trust auth, loopback only) on a free port in a temporary
# directory, exports FLEETCERT_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:PORT/postgres,
# runs the command, and always stops the cluster and removes the directory afterwards.
# Installs Debian's `postgresql` package first if no PostgreSQL server binaries are found.
# Works as root (the cluster then runs as the `postgres` user) or as an ordinary user.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi

find_pg_bin() {
    if [[ -n ${PG_BIN:-} && -x ${PG_BIN}/initdb ]]; then
        echo "$PG_BIN"
    elif [[ -x /usr/lib/postgresql/15/bin/initdb ]]; then
        echo /usr/lib/postgresql/15/bin
    else
        # Any other installed major version, newest first.
        ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r | while read -r dir; do
            if [[ -x $dir/initdb ]]; then
                echo "$dir"
                break
            fi
        done
    fi
}

PG_BIN=$(find_pg_bin)
if [[ -z $PG_BIN ]]; then
    echo "with-postgres: PostgreSQL server binaries not found; installing Debian's postgresql package" >&2
    if [[ $(id -u) -ne 0 ]]; then
        echo "with-postgres: need root to install postgresql (or set PG_BIN)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql >&2
    PG_BIN=$(find_pg_bin)
    if [[ -z $PG_BIN ]]; then
        echo "with-postgres: postgresql installed but initdb still not found" >&2
        exit 1
    fi
fi

# Who runs the server: initdb and postgres refuse to run as root.
if [[ $(id -u) -eq 0 ]]; then
    if ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    as_pg() {
        if command -v runuser >/dev/null 2>&1; then
            runuser -u postgres -- "$@"
        else
            su postgres -s /bin/sh -c '"$0" "$@"' -- "$@"
        fi
    }
else
    as_pg() { "$@"; }
fi

DIR=$(mktemp -d "${TMPDIR:-/tmp}/fleetcert-pg.XXXXXX")
chmod 755 "$DIR"
if [[ $(id -u) -eq 0 ]]; then
    chown postgres: "$DIR"
fi
DATA=$DIR/data
LOG=$DIR/postgres.log
STARTED=

cleanup() {
    local rc=$?
    if [[ -n $STARTED ]]; then
        (cd "$DIR" && as_pg "$PG_BIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1) || true
    fi
    rm -rf "$DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

(cd "$DIR" && as_pg "$PG_BIN/initdb" -D "$DATA" -A trust -U postgres -E UTF8 --no-instructions >/dev/null)

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

PORT=
for _ in $(seq 1 20); do
    candidate=$((20000 + RANDOM % 30000))
    if port_in_use "$candidate"; then
        continue
    fi
    if (cd "$DIR" && as_pg "$PG_BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
        -o "-p $candidate -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null); then
        PORT=$candidate
        STARTED=1
        break
    fi
done
if [[ -z $PORT ]]; then
    echo "with-postgres: could not start PostgreSQL; last log lines:" >&2
    tail -n 20 "$LOG" >&2 || true
    exit 1
fi

export FLEETCERT_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$PORT/postgres"
echo "with-postgres: PostgreSQL ($("$PG_BIN/postgres" --version)) running on 127.0.0.1:$PORT, data in $DATA" >&2
echo "with-postgres: FLEETCERT_TEST_POSTGRES_URL=$FLEETCERT_TEST_POSTGRES_URL" >&2

set +e
"$@"
rc=$?
set -e
exit "$rc"
