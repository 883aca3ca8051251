"""Fixtures of the fleet tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from raw_fleet import RawMqtt


@pytest.fixture
def raw_mqtt(mosquitto_dev) -> Iterator[Callable[..., RawMqtt]]:
    made: list[RawMqtt] = []

    def make(client_id: str, clean_session: bool = False) -> RawMqtt:
        conn = RawMqtt(mosquitto_dev.port, client_id, clean_session)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.close()
