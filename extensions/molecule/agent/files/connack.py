"""Print the broker's answer to one MQTT 5 CONNECT: ``connack.py HOST PORT USER`` with the password on stdin
(not in argv, where ps would show it). Exit 0 whatever the answer; 2 when no answer came."""

from __future__ import annotations

import sys

import paho.mqtt.client as mqtt


def main() -> int:
    host, port, user = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    codes: list[str] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda _c, _u, _f, code, _p: codes.append(str(code))
    client.username_pw_set(user, sys.stdin.read().strip())
    client.connect(host, port, keepalive=10)
    for _attempt in range(20):
        if codes or client.loop(0.5) != mqtt.MQTT_ERR_SUCCESS:
            break
    client.disconnect()
    if not codes:
        print("no CONNACK", file=sys.stderr)
        return 2
    print(codes[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
