"""Embedded MQTT 3.1.1 broker: asyncio, standard library only, for development fleets and tests.

``fedgen fleet`` uses it when no ``mosquitto`` binary is installed
(:func:`server_api.devfleet.broker_process.start_embedded_broker` runs it in a subprocess).  It
implements the part of MQTT 3.1.1 that the FedGen protocol uses and behaves like Mosquitto
2.0.11 where that matters (details in :mod:`.broker`).

Layers, each importing only the ones listed before it (sessions names the broker in type hints only):

* :mod:`.packets`: the wire format: packet dataclasses, decoding (bounds-checked, every
  malformed input a :class:`~.packets.ProtocolError`), encoding, topic names and filters.
* :mod:`.sessions`: broker state: persistent sessions, queued and in-flight messages,
  retained messages, shared groups, and the per-socket connection that reads packets.
* :mod:`.persistence`: retained messages and persistent sessions as a JSON file (written
  atomically with :func:`shared.fsutil.atomic_write`), loaded on start.
* :mod:`.broker`: :class:`EmbeddedBroker`: connect, subscribe, routing, shared groups,
  delivery and flow control.
* :mod:`.runner`: :func:`run_in_thread` / :class:`BrokerThread` and the command line
  (``python -m server_api.devfleet.embedded --host 127.0.0.1 --port 1883 --persistence FILE``).

Not supported: TLS, ACLs, MQTT 5, QoS 2, session expiry.  Development and tests only.
"""

from .broker import EmbeddedBroker
from .persistence import PersistenceError
from .runner import BrokerThread, main, run_in_thread

__all__ = ["BrokerThread", "EmbeddedBroker", "PersistenceError", "main", "run_in_thread"]
