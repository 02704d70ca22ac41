#!/usr/bin/env python3
"""A device that provisions itself through AWS IoT Fleet Provisioning over MQTT 5, driving the
unmodified AWS IoT Device SDK v2 for Python (PyPI `awsiotsdk`, on `awscrt`).

    python3 fleet_provisioning_device.py --host 127.0.0.1 --port P --ca CA.pem \
        --cert CLAIM.crt --key CLAIM.key --client-id ID --template NAME --mode csr|keys \
        [--csr FILE.pem [--csr-key FILE.key]] [--param K=V ...] [--out DIR] [--then-connect] \
        [--topic-suffix telemetry] [--timeout 10] [--token TOKEN] [--only-create]

Steps: connect with the claim certificate (mTLS, MQTT 5); CreateCertificateFromCsr (--mode csr)
or CreateKeysAndCertificate (--mode keys) through `awsiot.iotidentity.IotIdentityClientV2`;
RegisterThing with --template, the ownership token and the --param pairs; write device.crt and
device.key to --out; with --then-connect, disconnect, reconnect with the new certificate and key
and client id = thingName, publish QoS 1 to devices/<thingName>/<topic-suffix> and report the
PUBACK reason code.

--token TOKEN skips the create step and sends RegisterThing with that token (with
--then-connect, device.crt / device.key are read from --out, e.g. written by an earlier
--only-create run). --only-create stops after the create step.

Prints exactly one JSON object on stdout:
  success (exit 0):  {"certificateId", "thingName", "deviceConfiguration", "ownershipToken",
                      "reconnected": bool, "puback": int|null}
  rejected (exit 3): {"rejected": {"statusCode", "errorCode", "errorMessage"},
                      "step": "create-from-csr"|"create-keys"|"register-thing"}
  failure (exit 4):  {"error": "...", "step": "..."}
Usage errors exit 2 (argparse). Never runs past --timeout (plus a short grace for shutdown).

Dependencies: awsiotsdk/awscrt and the standard library; a CSR, when not given, is made with
`openssl req` (P-256).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

_print_lock = threading.Lock()
_printed = False


def emit(obj, code):
    """Prints the one JSON result and exits; only the first call prints."""
    global _printed
    with _print_lock:
        if not _printed:
            _printed = True
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: awscrt's native threads must not keep a finished (or timed-out) run alive.
    os._exit(code)


class Failure(Exception):
    def __init__(self, step, message):
        super().__init__(message)
        self.step = step
        self.message = message


class Rejected(Exception):
    def __init__(self, step, error):
        super().__init__(step)
        self.step = step
        self.error = error


def log(msg):
    sys.stderr.write("fleet_provisioning_device: %s\n" % msg)
    sys.stderr.flush()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--ca", required=True, help="CA bundle (PEM) that signed the broker's certificate")
    p.add_argument("--cert", required=True, help="claim certificate (PEM)")
    p.add_argument("--key", required=True, help="claim private key (PEM)")
    p.add_argument("--client-id", required=True)
    p.add_argument("--template", required=True, help="provisioning template name")
    p.add_argument("--mode", choices=["csr", "keys"], default="csr")
    p.add_argument("--csr", help="CSR (PEM) to send; default: generate a P-256 key and CSR")
    p.add_argument("--csr-key", help="private key of --csr, written as device.key (needed for --then-connect)")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="RegisterThing parameter (repeatable)")
    p.add_argument("--out", help="directory for device.crt / device.key (default: a temporary one)")
    p.add_argument("--then-connect", action="store_true",
                   help="reconnect with the new certificate as client id thingName and publish QoS 1")
    p.add_argument("--topic-suffix", default="telemetry")
    p.add_argument("--timeout", type=float, default=10.0, help="overall deadline in seconds")
    p.add_argument("--token", help="skip the create step; RegisterThing with this ownership token")
    p.add_argument("--only-create", action="store_true", help="stop after the create step")
    p.add_argument("--crt-log", choices=["Fatal", "Error", "Warn", "Info", "Debug", "Trace"],
                   help="awscrt log level, to stderr")
    a = p.parse_args(argv)
    params = {}
    for kv in a.param:
        if "=" not in kv:
            p.error("--param wants K=V, got %r" % kv)
        k, v = kv.split("=", 1)
        params[k] = v
    a.params = params
    if a.token is not None and a.only_create:
        p.error("--token and --only-create exclude each other")
    if a.csr_key and not a.csr:
        p.error("--csr-key needs --csr")
    if a.then_connect and a.token is None and a.mode == "csr" and a.csr and not a.csr_key:
        p.error("--then-connect with --csr needs --csr-key (the key the device reconnects with)")
    if a.then_connect and a.token is not None and not a.out:
        p.error("--then-connect with --token needs --out holding device.crt and device.key")
    if a.timeout <= 0:
        p.error("--timeout must be positive")
    return a


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return max(0.0, self.end - time.monotonic())

    def whole_seconds_left(self):
        # request-response operation timeout: an int >= 1
        return max(1, int(self.left()))


def error_text(exc):
    name = getattr(exc, "name", None)
    msg = getattr(exc, "message", None) or str(exc) or repr(exc)
    if name and name not in msg:
        return "%s: %s" % (name, msg)
    return msg


class Connection:
    """One started awscrt mqtt5.Client that has reached CONNACK success (or failed)."""

    def __init__(self, args, cert, key, client_id, deadline, step):
        from awscrt import mqtt5
        from awsiot import mqtt5_client_builder

        self.step = step
        self._connected = threading.Event()
        self._failed = threading.Event()
        self._stopped = threading.Event()
        self._failure = None

        def on_success(data):
            self._connected.set()

        def on_failure(data):
            rc = None
            if data.connack_packet is not None and data.connack_packet.reason_code is not None:
                rc = data.connack_packet.reason_code
            if rc is not None:
                self._failure = "CONNACK reason code %d (%s)" % (int(rc), getattr(rc, "name", rc))
            else:
                self._failure = "connection failed: %s" % error_text(data.exception)
            self._failed.set()

        def on_stopped(data):
            self._stopped.set()

        self.client = mqtt5_client_builder.mtls_from_path(
            endpoint=args.host,
            port=args.port,
            cert_filepath=cert,
            pri_key_filepath=key,
            ca_filepath=args.ca,
            client_id=client_id,
            on_lifecycle_connection_success=on_success,
            on_lifecycle_connection_failure=on_failure,
            on_lifecycle_stopped=on_stopped,
            connack_timeout_ms=max(1000, int(deadline.left() * 1000)),
            ack_timeout_sec=deadline.whole_seconds_left(),
            min_reconnect_delay_ms=60000,
            max_reconnect_delay_ms=60000,
        )
        self._mqtt5 = mqtt5
        self.client.start()
        while not (self._connected.is_set() or self._failed.is_set()):
            if deadline.left() <= 0:
                self.stop(1.0)
                raise Failure(step, "timed out waiting for CONNACK")
            self._connected.wait(min(0.05, deadline.left()) or 0.01)
        if not self._connected.is_set():
            self.stop(1.0)
            raise Failure(step, self._failure or "connection failed")

    def stop(self, wait):
        # With a DISCONNECT packet the client ends the session cleanly; stop() without one
        # just closes the TLS connection (mosquitto then logs a protocol error).
        try:
            self.client.stop(self._mqtt5.DisconnectPacket(
                reason_code=self._mqtt5.DisconnectReasonCode.NORMAL_DISCONNECTION))
        except Exception:
            try:
                self.client.stop()
            except Exception:
                pass
        self._stopped.wait(wait)


def make_csr(workdir, client_id):
    key = os.path.join(workdir, "generated.key")
    csr = os.path.join(workdir, "generated.csr")
    cmd = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
           "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=" + client_id]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Failure("create-from-csr", "openssl req failed: %s" % e)
    if r.returncode != 0:
        raise Failure("create-from-csr", "openssl req failed: %s" % r.stderr.decode(errors="replace").strip())
    with open(csr) as f:
        csr_pem = f.read()
    with open(key) as f:
        key_pem = f.read()
    return csr_pem, key_pem


def await_operation(future, step, deadline):
    """Waits for a V2 service future; returns the modeled response or raises Rejected/Failure."""
    import concurrent.futures

    import awsiot

    try:
        return future.result(timeout=deadline.left() + 0.5)
    except concurrent.futures.TimeoutError:
        raise Failure(step, "timed out waiting for the reply")
    except awsiot.V2ServiceException as e:
        if e.modeled_error is not None:
            m = e.modeled_error
            raise Rejected(step, {"statusCode": m.status_code, "errorCode": m.error_code,
                                  "errorMessage": m.error_message})
        inner = e.inner_error
        raise Failure(step, "%s: %s" % (e.message, error_text(inner) if inner is not None else "unknown"))
    except Exception as e:  # noqa: BLE001 - anything else the SDK raises
        raise Failure(step, error_text(e))


def write_file(path, text, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def run(args, deadline):
    from awscrt import mqtt5, mqtt_request_response
    from awsiot import iotidentity

    if args.crt_log:
        import awscrt.io
        awscrt.io.init_logging(getattr(awscrt.io.LogLevel, args.crt_log), "stderr")

    tmpdir = tempfile.mkdtemp(prefix="fleetprov-")
    try:
        out = args.out or tmpdir
        os.makedirs(out, exist_ok=True)
        crt_path = os.path.join(out, "device.crt")
        key_path = os.path.join(out, "device.key")

        result = {"certificateId": None, "thingName": None, "deviceConfiguration": None,
                  "ownershipToken": None, "reconnected": False, "puback": None}

        # Inputs of the create step, before any network traffic.
        csr_pem = key_pem = None
        if args.token is None and args.mode == "csr":
            if args.csr:
                with open(args.csr) as f:
                    csr_pem = f.read()
                if args.csr_key:
                    with open(args.csr_key) as f:
                        key_pem = f.read()
            else:
                csr_pem, key_pem = make_csr(tmpdir, args.client_id)

        step = "connect"
        conn = Connection(args, args.cert, args.key, args.client_id, deadline, step)
        try:
            identity = iotidentity.IotIdentityClientV2(
                conn.client,
                mqtt_request_response.ClientOptions(
                    max_request_response_subscriptions=2,
                    max_streaming_subscriptions=2,
                    operation_timeout_in_seconds=deadline.whole_seconds_left(),
                ),
            )

            if args.token is None:
                if args.mode == "csr":
                    step = "create-from-csr"
                    resp = await_operation(
                        identity.create_certificate_from_csr(
                            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr_pem)),
                        step, deadline)
                else:
                    step = "create-keys"
                    resp = await_operation(
                        identity.create_keys_and_certificate(iotidentity.CreateKeysAndCertificateRequest()),
                        step, deadline)
                    key_pem = resp.private_key
                if not resp.certificate_ownership_token:
                    raise Failure(step, "accepted reply without certificateOwnershipToken")
                if not resp.certificate_pem:
                    raise Failure(step, "accepted reply without certificatePem")
                result["certificateId"] = resp.certificate_id
                result["ownershipToken"] = resp.certificate_ownership_token
                write_file(crt_path, resp.certificate_pem, 0o644)
                if key_pem:
                    write_file(key_path, key_pem, 0o600)
                token = resp.certificate_ownership_token
            else:
                token = args.token
                result["ownershipToken"] = token

            if args.only_create:
                return result

            step = "register-thing"
            reg = await_operation(
                identity.register_thing(iotidentity.RegisterThingRequest(
                    template_name=args.template,
                    certificate_ownership_token=token,
                    parameters=args.params or None)),  # no --param: no "parameters" key
                step, deadline)
            if not reg.thing_name:
                raise Failure(step, "accepted reply without thingName")
            result["thingName"] = reg.thing_name
            result["deviceConfiguration"] = reg.device_configuration
        finally:
            conn.stop(min(2.0, max(0.5, deadline.left())))

        if args.then_connect:
            step = "reconnect"
            if not (os.path.exists(crt_path) and os.path.exists(key_path)):
                raise Failure(step, "no device.crt and device.key in %s to reconnect with" % out)
            dev = Connection(args, crt_path, key_path, result["thingName"], deadline, step)
            try:
                result["reconnected"] = True
                step = "publish"
                topic = "devices/%s/%s" % (result["thingName"], args.topic_suffix)
                fut = dev.client.publish(mqtt5.PublishPacket(
                    topic=topic, qos=mqtt5.QoS.AT_LEAST_ONCE,
                    payload=json.dumps({"thingName": result["thingName"], "ts": time.time()}).encode()))
                try:
                    done = fut.result(timeout=deadline.left() + 0.5)
                except Exception as e:  # noqa: BLE001
                    raise Failure(step, "publish to %s failed: %s" % (topic, error_text(e)))
                if done is None or done.puback is None:
                    raise Failure(step, "publish to %s completed without a PUBACK" % topic)
                result["puback"] = int(done.puback.reason_code)
            finally:
                dev.stop(min(2.0, max(0.5, deadline.left())))
        return result
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def main(argv):
    args = parse_args(argv)
    deadline = Deadline(args.timeout)

    # The watchdog: whatever blocks, the run ends shortly after the deadline.
    def watchdog():
        emit({"error": "overall deadline of %gs passed" % args.timeout, "step": "deadline"}, 4)

    t = threading.Timer(args.timeout + 3.0, watchdog)
    t.daemon = True
    t.start()

    try:
        import awscrt  # noqa: F401
        import awsiot  # noqa: F401
    except ImportError as e:
        emit({"error": "awsiotsdk is not installed: %s" % e, "step": "import"}, 4)

    try:
        result = run(args, deadline)
    except Rejected as r:
        emit({"rejected": r.error, "step": r.step}, 3)
    except Failure as f:
        emit({"error": f.message, "step": f.step}, 4)
    except Exception as e:  # noqa: BLE001
        emit({"error": "%s: %s" % (type(e).__name__, e), "step": "internal"}, 4)
    emit(result, 0)


if __name__ == "__main__":
    main(sys.argv[1:])
