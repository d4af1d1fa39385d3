"""One paho-mqtt client on Debian 12's python3-paho-mqtt 1.6 (callback API v1) and on paho-mqtt 2.x (v2).

The rest of the agent sees three plain callbacks and never the version differences. Each callback is
guarded: paho re-raises an exception from a callback out of its network loop, and no bad message or bug
in a handler may end the agent's connection loop.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

PAHO_VERSION: str = getattr(paho.mqtt, "__version__", "unknown")
CALLBACK_API_V2 = hasattr(mqtt, "CallbackAPIVersion")


def new_client(client_id: str) -> mqtt.Client:
    """MQTT 3.1.1 with a persistent session: the broker keeps the subscription and queues QoS 1 commands
    while the agent is away (a reboot), and the command ledger drops the redeliveries that brings."""
    options: dict[str, Any] = {"client_id": client_id, "clean_session": False, "protocol": mqtt.MQTTv311}
    if CALLBACK_API_V2:
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **options)
    return mqtt.Client(**options)


def set_callbacks(
    client: mqtt.Client,
    on_connect: Callable[[bool, str], None],
    on_disconnect: Callable[[str], None],
    on_message: Callable[[mqtt.MQTTMessage], None],
) -> None:
    """``on_connect(accepted, reason)``, ``on_disconnect(reason)``, ``on_message(message)``."""
    connected, disconnected, received = _guarded(on_connect), _guarded(on_disconnect), _guarded(on_message)
    if CALLBACK_API_V2:
        client.on_connect = lambda _client, _data, _flags, reason, _props: connected(not reason.is_failure, str(reason))
        client.on_disconnect = lambda _client, _data, _flags, reason, _props: disconnected(str(reason))
    else:
        client.on_connect = lambda _client, _data, _flags, code: connected(code == 0, mqtt.connack_string(code))
        client.on_disconnect = lambda _client, _data, code: disconnected(mqtt.error_string(code))
    client.on_message = lambda _client, _data, message: received(message)


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(callback)
    def guarded(*args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("error in the MQTT %s callback", callback.__name__)

    return guarded
