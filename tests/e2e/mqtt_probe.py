"""An independent MQTT 5 client for the e2e tests (paho-mqtt 2.x): connects with a client
certificate, subscribes, publishes at QoS 1, collects what it receives, and prints one JSON
object with every reason code the broker answered, so the Rust test can assert on them.

    mqtt_probe.py --port P --cafile CA --cert CRT --key KEY --client-id ID \
        [--subscribe FILTER]... [--publish TOPIC=PAYLOAD]... [--stay SECONDS]
        [--ready] [--then-publish TOPIC=PAYLOAD]... [--expect-messages N]

With `--ready`, once connected, subscribed and done with `--publish`, it prints a line
`{"ready": true, "connack": int}` and waits (at most `--timeout`) for a line on stdin
before publishing the `--then-publish` items. With `--expect-messages N` it stays until N messages arrived (at
most `--timeout`) instead of `--stay` seconds.

Output: {"connack": int|null, "subscribe": [{"filter", "reason"}], "publish": [{"topic",
"reason"}], "messages": [{"topic", "payload"}], "disconnect": int|null,
"disconnected_after": float|null}. `connack` is null when the broker closed the connection
without answering; `disconnect` and `disconnected_after` (seconds after the start) are null
unless the broker ended the session (the probe's own DISCONNECT at the end is not counted). Exits 0 whenever it could print a result.
"""

import argparse
import json
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--subscribe", action="append", default=[])
    parser.add_argument("--publish", action="append", default=[])
    parser.add_argument("--stay", type=float, default=1.0,
                        help="seconds to stay connected after the last action")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--ready", action="store_true",
                        help="say when connected and subscribed, then wait for stdin")
    parser.add_argument("--then-publish", action="append", default=[],
                        help="published after a line arrives on stdin (with --ready)")
    parser.add_argument("--expect-messages", type=int, default=None)
    args = parser.parse_args()

    result = {"connack": None, "subscribe": [], "publish": [], "messages": [],
              "disconnect": None, "disconnected_after": None}
    connected = threading.Event()
    closed = threading.Event()
    leaving = threading.Event()
    acked = threading.Condition()
    pending = {}
    started = time.monotonic()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id,
                         protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=args.cafile, certfile=args.cert, keyfile=args.key,
                   tls_version=ssl.PROTOCOL_TLS_CLIENT)

    def on_connect(_c, _u, _flags, reason_code, _props):
        result["connack"] = reason_code.value
        connected.set()

    def on_disconnect(_c, _u, _flags, reason_code, _props):
        if result["disconnected_after"] is None and not leaving.is_set():
            result["disconnect"] = reason_code.value if reason_code is not None else None
            result["disconnected_after"] = round(time.monotonic() - started, 3)
        closed.set()
        connected.set()
        with acked:
            acked.notify_all()

    def on_subscribe(_c, _u, mid, reason_codes, _props):
        with acked:
            pending[mid] = [rc.value for rc in reason_codes]
            acked.notify_all()

    def on_publish(_c, _u, mid, reason_code, _props):
        with acked:
            pending[mid] = reason_code.value
            acked.notify_all()

    def on_message(_c, _u, message):
        with acked:
            result["messages"].append({"topic": message.topic,
                                       "payload": message.payload.decode("utf-8", "replace")})
            acked.notify_all()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message

    def wait_for(mid):
        deadline = time.monotonic() + args.timeout
        with acked:
            while mid not in pending and not closed.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                acked.wait(left)
            return pending.get(mid)

    try:
        client.connect(args.host, args.port, keepalive=30)
    except (OSError, ssl.SSLError) as e:
        result["error"] = str(e)
        print(json.dumps(result))
        return
    client.loop_start()
    connected.wait(args.timeout)
    if result["connack"] == 0 and not closed.is_set():
        for topic_filter in args.subscribe:
            _, mid = client.subscribe(topic_filter, qos=1)
            codes = wait_for(mid)
            result["subscribe"].append({"filter": topic_filter,
                                        "reason": codes[0] if codes else None})
        def publish(items):
            for item in items:
                topic, _, payload = item.partition("=")
                info = client.publish(topic, payload, qos=1)
                result["publish"].append({"topic": topic, "reason": wait_for(info.mid)})

        publish(args.publish)
        if args.ready:
            print(json.dumps({"ready": True, "connack": result["connack"]}), flush=True)
            line = []
            reader = threading.Thread(target=lambda: line.append(sys.stdin.readline()),
                                      daemon=True)
            reader.start()
            reader.join(args.timeout)
            if line and not closed.is_set():
                publish(args.then_publish)
        if args.expect_messages is not None:
            deadline = time.monotonic() + args.timeout
            with acked:
                while (len(result["messages"]) < args.expect_messages
                       and not closed.is_set()):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    acked.wait(left)
        else:
            closed.wait(args.stay)
        if not closed.is_set():
            leaving.set()
            client.disconnect()
    client.loop_stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
