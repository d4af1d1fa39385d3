"""NodeFoundry node agent and the MQTT protocol it shares with the server."""

__version__ = "0.1.0"
