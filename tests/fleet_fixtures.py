"""A factory of fleets (server_api.fleet.Fleet) on the suite's Mosquitto, each in its own work directory,
all stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from server_api.devfleet.fleet import Fleet, FleetConfig


@pytest.fixture
def fleet_maker(mosquitto_dev, tmp_path) -> Iterator[Callable[[FleetConfig], Fleet]]:
    made: list[Fleet] = []

    def make(cfg: FleetConfig) -> Fleet:
        cfg = replace(cfg, broker_url=cfg.broker_url or mosquitto_dev.url,
                      workdir=cfg.workdir or tmp_path / f"fleet{len(made)}")
        fleet = Fleet(cfg)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.stop()
