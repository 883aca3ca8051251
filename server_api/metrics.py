"""Prometheus metrics of the round server (`GET /metrics`, docs/api.md lists them with example queries).

Module-level metric objects on a registry of their own: the round engine increments them, the API exposes
them. Labels are bounded: job ids, update statuses and the protocol's reason codes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

ROUNDS = Counter("fedgen_rounds_total", "Round attempts ended, by outcome (closed | failed)", ["job", "status"],
                 registry=REGISTRY)
UPDATES = Counter("fedgen_updates_total", "Updates answered, by status and rejection reason",
                  ["job", "status", "reason"], registry=REGISTRY)
REFUSED = Counter("fedgen_messages_refused_total", "Messages refused before they became updates (presence, "
                  "topics), by reason", ["job", "reason"], registry=REGISTRY)
BYTES_IN = Counter("fedgen_bytes_received_total", "Bytes of accepted updates", ["job"], registry=REGISTRY)
BYTES_OUT = Counter("fedgen_bytes_published_total", "Bytes of artifacts published (retained chunks)", ["job"],
                    registry=REGISTRY)
DEVICES_ONLINE = Gauge("fedgen_devices_online", "Devices whose presence says online", ["job"], registry=REGISTRY)
CURRENT_ROUND = Gauge("fedgen_current_round", "The round a job trains next", ["job"], registry=REGISTRY)
ROUND_SECONDS = Histogram("fedgen_round_duration_seconds", "From a round's opening to its end", ["job"],
                          buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600), registry=REGISTRY)
CLOSE_SECONDS = Histogram("fedgen_round_close_seconds", "Closing a round: aggregation, generator, export, store",
                          ["job"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=REGISTRY)
GENERATOR_SECONDS = Histogram("fedgen_generator_training_seconds", "FedGen's generator training per round", ["job"],
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=REGISTRY)
INGEST_SECONDS = Histogram("fedgen_ingest_seconds", "From a complete update's arrival to its ack", ["job"],
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
                           registry=REGISTRY)
DATABASE_UP = Gauge("fedgen_database_up", "1 when the database answers", registry=REGISTRY)
BROKER_UP = Gauge("fedgen_broker_connected", "1 when the server is connected to the broker", registry=REGISTRY)
