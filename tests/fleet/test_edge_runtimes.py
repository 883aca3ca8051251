"""`fedgen fleet --edge-runtime {torch,lite,mixed}`: a FedGen job of 10 rounds on the shipped subset reaches,
round by round, the server-side accuracy of the torch fleet with the same seed, within the tolerance of the
fleet/simulation parity test (tests/fleet/test_fleet.py, PARITY_TOLERANCE = 0.02).

The lite runtime trains the same batches on the same samples as torch (shared.algorithm.schedule) and agrees
with it to float32 round-off (tests/edge/test_lite_parity.py), so the rounds should differ by round-off only;
the tolerance is the fleet's, not a loosened one. Every device takes part in every round (active = clients),
so the mixed fleet aggregates torch and lite updates in each round. Kept short: 3 devices, 5 local steps,
200 samples per class.

The three jobs have the same id (it comes from algorithm and seed), so each fleet starts its own broker in its
work directory, as `fedgen fleet` does (Mosquitto when installed, else the embedded broker): a finished job's
retained announcements must not reach the next fleet's devices.
"""

from __future__ import annotations

import numpy as np
import pytest

from server_api.devfleet.fleet import Fleet, FleetConfig

pytestmark = pytest.mark.slow
PARITY_TOLERANCE = 0.02  # the value of tests/fleet/test_fleet.py
ROUNDS = 10


def config(edge_runtime: str, **overrides) -> FleetConfig:
    return FleetConfig(**{**dict(clients=3, active=3, rounds=ROUNDS, algorithm="fedgen", dataset="mnist-subset",
                                 alpha=1.0, samples_per_class=200, local_steps=5, seed=3, round_timeout_s=120,
                                 progress=False, edge_runtime=edge_runtime), **overrides})


@pytest.fixture
def own_broker_fleets(tmp_path):
    """Fleets that each start (and stop) their own broker; all stopped at teardown."""
    made: list[Fleet] = []

    def make(cfg: FleetConfig) -> Fleet:
        cfg.workdir = tmp_path / f"fleet-{len(made)}-{cfg.edge_runtime}"
        made.append(Fleet(cfg))
        return made[-1]

    yield make
    for fleet in made:
        fleet.stop()


def run(make, edge_runtime: str) -> tuple[Fleet, list[float]]:
    fleet = make(config(edge_runtime))
    summary = fleet.run(timeout=600)
    assert summary["job_status"] == "finished", summary
    assert [r["round"] for r in summary["rounds"]] == list(range(ROUNDS))
    assert all(r["num_updates"] == 3 and r["attempt"] == 0 for r in summary["rounds"]), summary["rounds"]
    assert summary["config"]["fleet"]["edge_runtime"] == edge_runtime
    return fleet, [r["accuracy"] for r in summary["rounds"]]


def runtimes_of(fleet: Fleet) -> dict[str, str]:
    """client id -> the runtime its presence reported."""
    clients = fleet.request("GET", f"/clients?job_id={fleet.job_id}")["items"]
    return {c["client_id"]: c["device_info"].get("runtime") for c in clients}


def test_config_maps_devices_to_runtimes():
    assert [config("mixed").runtime_of(k) for k in range(4)] == ["torch", "lite", "torch", "lite"]
    assert {config("lite").runtime_of(k) for k in range(4)} == {"lite"}
    assert {FleetConfig().runtime_of(k) for k in range(4)} == {"torch"}
    with pytest.raises(ValueError, match="edge_runtime"):
        FleetConfig(edge_runtime="onnx")


def test_lite_and_mixed_fleets_match_the_torch_fleet(own_broker_fleets):
    torch_fleet, torch_acc = run(own_broker_fleets, "torch")
    assert torch_acc[-1] > torch_acc[0] and torch_acc[-1] > 0.5, torch_acc  # it learns (chance is 0.1)
    assert runtimes_of(torch_fleet) == {"c0": "torch", "c1": "torch", "c2": "torch"}
    torch_fleet.stop()
    for edge_runtime, expected in (("lite", {"c0": "lite", "c1": "lite", "c2": "lite"}),
                                   ("mixed", {"c0": "torch", "c1": "lite", "c2": "torch"})):
        fleet, acc = run(own_broker_fleets, edge_runtime)
        assert runtimes_of(fleet) == expected
        fleet.stop()
        gap = np.abs(np.array(acc) - np.array(torch_acc))
        print(f"{edge_runtime}: max |accuracy - torch's| {gap.max():.4f}; accuracy {acc}; torch {torch_acc}")
        assert gap.max() <= PARITY_TOLERANCE, (edge_runtime, acc, torch_acc)
