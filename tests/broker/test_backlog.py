"""The server's bounded inbox (shared.mqtt.Backlog): a link with `max_backlog` stops reading its socket while
that many received messages are not handled yet, so a burst far bigger than the bound waits in a real
Mosquitto, not in the server's memory, and nothing is lost."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from broker_fixtures import publish

from shared.mqtt import MqttLink

BURST = 2000
TOPIC = "fedgen/v1/backlog/clients/dev/update"


def _burst(mqtt_clients, port: int, n: int = BURST) -> None:
    sender = mqtt_clients(port, "sender", clean_session=True)
    for i in range(n - 1):
        sender.publish(TOPIC, f"{i:06d}".encode(), qos=1)
    publish(sender, TOPIC, f"{n - 1:06d}".encode())  # waits for the last one's PUBACK: all are at the broker


def _consume(link: MqttLink, seen: list[str], stop: threading.Event, delay: float, answer: bool = False) -> None:
    while not stop.is_set():
        try:
            msg = link.inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        time.sleep(delay)  # a slow server
        seen.append(msg.payload.decode())
        if answer:  # as the server acknowledges each update: a QoS 1 publish whose PUBACK it does not wait for
            link.publish("fedgen/v1/backlog/clients/dev/ack", msg.payload)
        msg.done()


@pytest.mark.parametrize(("max_backlog", "answer"), [(30, False), (200, False), (30, True)])
def test_a_slow_owner_holds_at_most_its_backlog_and_loses_nothing(mosquitto_dev, mqtt_clients, max_backlog,
                                                                 answer):
    """`answer`: the owner publishes an acknowledgement per message, as the server does. paho reads as many
    packets per wake-up as it has publishes awaiting their PUBACK, so the bound must hold between packets,
    not only between wake-ups (it once let a 10,000-device burst hold ~3,000 full updates for a bound of
    1,000)."""
    link = MqttLink(mosquitto_dev.url, "server-backlog", clean_session=False, max_backlog=max_backlog)
    link.subscribe(TOPIC)
    link.start()
    seen: list[str] = []
    stop = threading.Event()
    worker = threading.Thread(target=_consume, args=(link, seen, stop, 0.0005, answer), daemon=True)
    try:
        worker.start()  # handling while the burst still arrives
        _burst(mqtt_clients, mosquitto_dev.port)
        deadline = time.monotonic() + 120
        while len(seen) < BURST and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join(5)
        link.stop()
    assert sorted(seen) == [f"{i:06d}" for i in range(BURST)]  # every message once: none lost, none repeated
    assert max_backlog <= link.backlog.peak <= max_backlog + 1, link.backlog.peak  # +1: the packet being read
    assert link.backlog.count == 0


def test_an_owner_that_handles_nothing_holds_only_its_backlog(mosquitto_dev, mqtt_clients):
    link = MqttLink(mosquitto_dev.url, "server-stalled", clean_session=False, max_backlog=50)
    link.subscribe(TOPIC)
    link.start()
    try:
        _burst(mqtt_clients, mosquitto_dev.port, 500)
        time.sleep(1.0)
        held = [link.inbox.get_nowait() for _ in range(link.inbox.qsize())]
        assert 50 <= len(held) <= 51, len(held)  # the other ~450 wait at the broker
        assert link.connected.is_set()
        for msg in held:
            msg.done()
        seen = {m.payload for m in held}
        deadline = time.monotonic() + 60
        while len(seen) < 500 and time.monotonic() < deadline:
            try:
                msg = link.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.add(msg.payload)
            msg.done()
    finally:
        link.stop()
    assert seen == {f"{i:06d}".encode() for i in range(500)}


def test_a_link_without_a_bound_reads_everything(mosquitto_dev, mqtt_clients):
    link = MqttLink(mosquitto_dev.url, "edge-like", clean_session=False)
    link.subscribe(TOPIC)
    link.start()
    try:
        _burst(mqtt_clients, mosquitto_dev.port, 300)
        deadline = time.monotonic() + 30
        while link.inbox.qsize() < 300 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert link.backlog is None and link.inbox.qsize() == 300  # all of it, unhandled: the old behaviour
    finally:
        link.stop()


def test_a_pause_past_the_keepalive_loses_nothing(mosquitto_dev, mqtt_clients):
    """Handling nothing for longer than the keepalive: paho's ping times out (its answer is not read) and the
    link reconnects; the broker redelivers what it had sent unacknowledged, so every message still arrives."""
    link = MqttLink(mosquitto_dev.url, "server-paused", clean_session=False, max_backlog=20, keepalive=1)
    link.subscribe(TOPIC)
    link.start()
    seen: set[bytes] = set()
    try:
        _burst(mqtt_clients, mosquitto_dev.port, 300)
        time.sleep(4.0)  # several keepalive periods without handling anything
        deadline = time.monotonic() + 60
        while len(seen) < 300 and time.monotonic() < deadline:
            try:
                msg = link.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.add(msg.payload)
            msg.done()
    finally:
        link.stop()
    assert seen == {f"{i:06d}".encode() for i in range(300)}


def test_a_full_backlog_does_not_block_the_owners_own_publishes(mosquitto_dev, mqtt_clients):
    """The owner that would drain the backlog may itself wait for a PUBACK (the server publishing a model
    version): the link reads on for it rather than stall both."""
    link = MqttLink(mosquitto_dev.url, "server-publishing", clean_session=False, max_backlog=10)
    link.subscribe(TOPIC)
    link.start()
    try:
        _burst(mqtt_clients, mosquitto_dev.port, 100)
        time.sleep(0.5)
        assert link.backlog.full
        assert link.publish("fedgen/v1/backlog/manifest", b"m", retain=True, wait=10)
    finally:
        link.stop()
