#!/usr/bin/env bash
# Runs a command with what the MQTT tests need: the real mosquitto broker and clients, and
# independent MQTT client libraries in a virtualenv:
#
#   scripts/with-mosquitto.sh cargo test --workspace -- --include-ignored mqtt
#
# Installs Debian's mosquitto, mosquitto-clients and mosquitto-dev if /usr/sbin/mosquitto is
# missing (with a policy-rc.d in place, so the package does not start a system broker on port
# 1883; the tests start their own brokers on free loopback ports and stop them), and
# paho-mqtt 2.x and the AWS IoT Device SDK v2 for Python (awsiotsdk, with awscrt) into a
# virtualenv at .ci-cache/mqtt. Exports for the command:
#
#   FLEETCERT_TEST_MOSQUITTO=/usr/sbin/mosquitto     the broker
#   FLEETCERT_TEST_MOSQUITTO_PUB / _SUB              mosquitto_pub / mosquitto_sub (MQTT 3.1.1)
#   FLEETCERT_TEST_MQTT_PYTHON=/abs/.../python3      a python3 with paho-mqtt 2.x (MQTT 5) and awsiotsdk
#
# Then runs the command and exits with its status.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.ci-cache/mqtt

added_policy_rc=0
cleanup() {
    local rc=$?
    if [[ $added_policy_rc == 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
    exit "$rc"
}
trap cleanup EXIT

if [[ ! -x /usr/sbin/mosquitto || ! -x /usr/bin/mosquitto_pub ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "with-mosquitto: need root to install mosquitto (Debian packages mosquitto, mosquitto-clients, mosquitto-dev)" >&2
        exit 1
    fi
    echo "with-mosquitto: installing mosquitto, mosquitto-clients and mosquitto-dev" >&2
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy_rc=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients mosquitto-dev >&2
    if [[ $added_policy_rc == 1 ]]; then
        rm -f /usr/sbin/policy-rc.d
        added_policy_rc=0
    fi
fi

if [[ ! -x $VENV/bin/python3 ]] || ! "$VENV/bin/python3" -c 'import paho.mqtt, awsiot, awscrt' 2>/dev/null; then
    echo "with-mosquitto: installing paho-mqtt 2.x and awsiotsdk into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check 'paho-mqtt>=2,<3' awsiotsdk >&2
fi

export FLEETCERT_TEST_MOSQUITTO=/usr/sbin/mosquitto
export FLEETCERT_TEST_MOSQUITTO_PUB=/usr/bin/mosquitto_pub
export FLEETCERT_TEST_MOSQUITTO_SUB=/usr/bin/mosquitto_sub
export FLEETCERT_TEST_MQTT_PYTHON=$VENV/bin/python3
echo "with-mosquitto: $("$FLEETCERT_TEST_MOSQUITTO" -h 2>/dev/null | head -n 1), paho-mqtt $("$VENV/bin/python3" -c 'import paho.mqtt; print(paho.mqtt.__version__)')" >&2

set +e
"$@"
rc=$?
set -e
exit "$rc"
