"""Real-Mosquitto tests of the broker configs, users/ACL, TLS, queue limits and restarts.

Negative checks ("X is NOT delivered") are made non-vacuous with a positive control sent
*after* the forbidden message on the same connection: Mosquitto keeps per-publisher order,
so once the control arrives the forbidden message would already have arrived.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from broker_fixtures import (
    DEV_CONF,
    ClientState,
    ConnectRefused,
    ProdBroker,
    connect_client,
    publish,
    run_create_users,
    state_of,
    subscribe,
)
from paho.mqtt.client import Client

from server_api.devfleet.broker_process import (
    BrokerProcess,
    BrokerStartError,
    start_broker,
    start_embedded_broker,
    start_mosquitto,
)

pytestmark = pytest.mark.timeout(60)

JOB = "fedgen/v1/job1"
SETTLE = 0.3  # extra wait after the positive control before asserting absence
MakeClient = Callable[..., Client]


def _login(prod: ProdBroker, make: MakeClient, user: str, client_id: str | None = None, **kw: object) -> Client:
    return make(prod.port, client_id or user, username=user, password=prod.passwords[user], **kw)


def _server(prod: ProdBroker, make: MakeClient, suffix: str, **kw: object) -> Client:
    return _login(prod, make, "fedgen-server", f"fedgen-server-{suffix}", **kw)


def _assert_control_then_absent(watcher: Client, control_topic: str, forbidden: list[str]) -> None:
    state = state_of(watcher)
    assert state.wait_for(lambda msgs: any(m.topic == control_topic for m in msgs), 5), \
        f"positive control {control_topic} never arrived: the test would be vacuous"
    state.wait_for(lambda msgs: False, SETTLE)
    leaked = [m.topic for m in state.messages if m.topic in forbidden]
    assert not leaked, f"ACL let through: {leaked}"


# ------------------------------------------------------------------------------------ dev


def test_dev_anonymous_retained_qos1_reaches_late_subscriber(mosquitto_dev: BrokerProcess,
                                                              mqtt_clients: MakeClient) -> None:
    pub = mqtt_clients(mosquitto_dev.port, "anon-pub")
    publish(pub, f"{JOB}/round", b'{"round": 1}', qos=1, retain=True)
    late = mqtt_clients(mosquitto_dev.port, "anon-late")
    assert [c.value for c in subscribe(late, f"{JOB}/round", qos=1)] == [1]
    assert state_of(late).wait_count(1, 5)
    msg = state_of(late).messages[0]
    assert (msg.payload, msg.retain, msg.qos) == (b'{"round": 1}', True, 1)


def test_dev_broker_url_and_context_manager(tmp_path: Path) -> None:
    with start_mosquitto(DEV_CONF, tmp_path / "b") as broker:
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}" and broker.running
    assert not broker.running


def test_message_size_limit_drops_oversized_publish(mosquitto_dev: BrokerProcess, mqtt_clients: MakeClient) -> None:
    sub = mqtt_clients(mosquitto_dev.port, "size-sub")
    subscribe(sub, "size/#")
    pub = mqtt_clients(mosquitto_dev.port, "size-pub")
    publish(pub, "size/big", b"x" * (2 * 1024 * 1024))
    publish(pub, "size/chunk", b"x" * (256 * 1024))  # an artifact chunk: allowed
    _assert_control_then_absent(sub, "size/chunk", ["size/big"])


# ------------------------------------------------------------------------------------ prod auth


def test_prod_denies_anonymous(mosquitto_prod: ProdBroker) -> None:
    with pytest.raises(ConnectRefused) as err:
        connect_client(mosquitto_prod.port, "anon")
    # MQTT 3.1.1 CONNACK return code 5 "not authorised"; paho 2 reports it as ReasonCode 0x87.
    assert err.value.reason_code.value == 0x87


def test_prod_denies_wrong_password(mosquitto_prod: ProdBroker) -> None:
    with pytest.raises(ConnectRefused) as err:
        connect_client(mosquitto_prod.port, "dev-a", username="dev-a", password="not-the-password")
    assert err.value.reason_code.value == 0x87  # 2.0.11 sends 5, not 4 "bad user name or password"


def test_prod_accepts_right_password(mosquitto_prod: ProdBroker, mqtt_clients: MakeClient) -> None:
    assert _login(mosquitto_prod, mqtt_clients, "dev-a").is_connected()


# ------------------------------------------------------------------------------------ prod ACL


def test_device_cannot_publish_to_other_devices_topics(mosquitto_prod: ProdBroker, mqtt_clients: MakeClient) -> None:
    server = _server(mosquitto_prod, mqtt_clients, "acl-pub")
    subscribe(server, f"{JOB}/clients/#")
    dev_a = _login(mosquitto_prod, mqtt_clients, "dev-a")
    forbidden = [f"{JOB}/clients/dev-b/update/0", f"{JOB}/clients/dev-b/presence"]
    for topic in forbidden:
        publish(dev_a, topic, b"spoof")  # Mosquitto PUBACKs and drops it (MQTT 3.1.1)
    publish(dev_a, f"{JOB}/clients/dev-a/update/0", b"mine")
    _assert_control_then_absent(server, f"{JOB}/clients/dev-a/update/0", forbidden)
    assert dev_a.is_connected()


def test_device_cannot_subscribe_to_other_devices_topics(mosquitto_prod: ProdBroker, mqtt_clients: MakeClient) -> None:
    dev_a = _login(mosquitto_prod, mqtt_clients, "dev-a")
    denied = {t: subscribe(dev_a, t) for t in (f"{JOB}/clients/dev-b/ack", f"{JOB}/clients/dev-b/update/#",
                                              f"{JOB}/clients/+/update/#")}
    own = subscribe(dev_a, f"{JOB}/clients/dev-a/ack")
    # Observed on Mosquitto 2.0.11 with acl_file (MQTT 3.1.1): the SUBACK GRANTS QoS 1 even
    # for topics the user may not read; the ACL is applied per message at delivery time.
    assert all(codes[0].value == 1 for codes in denied.values()), denied
    assert own[0].value == 1
    server = _server(mosquitto_prod, mqtt_clients, "acl-sub")
    dev_b = _login(mosquitto_prod, mqtt_clients, "dev-b")
    publish(server, f"{JOB}/clients/dev-b/ack", b"for b")
    publish(dev_b, f"{JOB}/clients/dev-b/update/0", b"b's update")
    publish(server, f"{JOB}/clients/dev-a/ack", b"for a")
    state = state_of(dev_a)
    assert state.wait_for(lambda msgs: any(m.topic.endswith("dev-a/ack") for m in msgs), 5)
    state.wait_for(lambda msgs: False, SETTLE)
    assert [m.topic for m in state.messages] == [f"{JOB}/clients/dev-a/ack"]


@pytest.mark.parametrize("suffix", ["round", "manifest", "artifacts/abc123/0", "servers/chunks/dev-b",
                                    "servers/chunks/dev-a"])
def test_device_cannot_write_server_topics(mosquitto_prod: ProdBroker, mqtt_clients: MakeClient, suffix: str) -> None:
    topic = f"{JOB}/{suffix}"
    server = _server(mosquitto_prod, mqtt_clients, f"w-{suffix.split('/')[0]}")
    subscribe(server, f"{JOB}/#")
    dev_a = _login(mosquitto_prod, mqtt_clients, "dev-a")
    publish(dev_a, topic, b"forged", retain=True)
    publish(dev_a, f"{JOB}/clients/dev-a/presence", b"online")
    _assert_control_then_absent(server, f"{JOB}/clients/dev-a/presence", [topic])


def test_server_writes_round_manifest_artifacts_devices_read(mosquitto_prod: ProdBroker,
                                                             mqtt_clients: MakeClient) -> None:
    server = _server(mosquitto_prod, mqtt_clients, "writer")
    topics = [f"{JOB}/round", f"{JOB}/manifest", f"{JOB}/artifacts/deadbeef/0"]
    for topic in topics:
        publish(server, topic, b"v1", retain=True)
    try:
        dev_b = _login(mosquitto_prod, mqtt_clients, "dev-b")
        for topic in (f"{JOB}/round", f"{JOB}/manifest", f"{JOB}/artifacts/#"):
            assert subscribe(dev_b, topic)[0].value == 1
        assert state_of(dev_b).wait_count(3, 5)
        assert sorted(m.topic for m in state_of(dev_b).messages) == sorted(topics)
    finally:
        for topic in topics:  # clear retained state shared with other tests
            publish(server, topic, b"", retain=True)


def test_server_shared_subscription_receives_uploads(mosquitto_prod: ProdBroker, mqtt_clients: MakeClient) -> None:
    server = _server(mosquitto_prod, mqtt_clients, "shared")
    codes = subscribe(server, f"$share/fedgen-server/{JOB}/clients/+/update/#")
    assert codes[0].value == 1
    dev_a = _login(mosquitto_prod, mqtt_clients, "dev-a")
    publish(dev_a, f"{JOB}/clients/dev-a/update/7", b"u")
    assert state_of(server).wait_count(1, 5)


def test_device_shared_subscription_on_others_delivers_nothing(mosquitto_prod: ProdBroker,
                                                               mqtt_clients: MakeClient) -> None:
    dev_a = _login(mosquitto_prod, mqtt_clients, "dev-a")
    assert subscribe(dev_a, f"$share/g/{JOB}/clients/+/update/#")[0].value == 1  # granted, see above
    subscribe(dev_a, f"{JOB}/clients/dev-a/ack")
    dev_b = _login(mosquitto_prod, mqtt_clients, "dev-b")
    publish(dev_b, f"{JOB}/clients/dev-b/update/0", b"b's update")
    server = _server(mosquitto_prod, mqtt_clients, "shared-ctl")
    publish(server, f"{JOB}/clients/dev-a/ack", b"ctl")
    _assert_control_then_absent(dev_a, f"{JOB}/clients/dev-a/ack", [f"{JOB}/clients/dev-b/update/0"])


def test_device_last_will_on_own_presence(mosquitto_prod: ProdBroker, mqtt_clients: MakeClient) -> None:
    server = _server(mosquitto_prod, mqtt_clients, "will")
    subscribe(server, f"{JOB}/clients/dev-b/presence")
    presence = f"{JOB}/clients/dev-b/presence"
    dev_b = connect_client(mosquitto_prod.port, "dev-b", username="dev-b", password=mosquitto_prod.passwords["dev-b"],
                           will=(presence, b"offline", 1, True))
    dev_b.loop_stop()
    dev_b.socket().close()  # abrupt loss: the broker publishes the will
    try:
        assert state_of(server).wait_for(lambda msgs: any(m.payload == b"offline" for m in msgs), 5)
    finally:
        publish(server, presence, b"", retain=True)


# ------------------------------------------------------------------------------------ TLS


def test_tls_with_project_ca_connects(mosquitto_prod: ProdBroker, mqtt_clients: MakeClient) -> None:
    client = mqtt_clients(mosquitto_prod.tls_port, "dev-a", username="dev-a",
                          password=mosquitto_prod.passwords["dev-a"], ca_certs=mosquitto_prod.ca_file)
    assert client.is_connected()


def test_tls_without_project_ca_is_refused(mosquitto_prod: ProdBroker) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        connect_client(mosquitto_prod.tls_port, "dev-a", username="dev-a",
                       password=mosquitto_prod.passwords["dev-a"], tls_default_trust=True)


# ------------------------------------------------------------------------------------ queues


def _drain(state: ClientState, expected: int, quiet: float = 0.5, limit: float = 20.0) -> int:
    """Wait until ``expected`` distinct messages arrived or none came for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        seen = len(state.messages)
        if seen >= expected:
            break
        if not state.wait_for(lambda msgs, seen=seen: len(msgs) > seen, quiet):
            break  # no progress: the rest was dropped
    state.wait_for(lambda msgs: False, SETTLE)  # late duplicates would show up here
    return len({m.payload for m in state.messages})


def _queue_burst(port: int, n: int, server_kw: dict[str, object], device_kw: dict[str, object], tag: str) -> int:
    """Persistent subscriber goes away, ``n`` QoS 1 uploads arrive, it comes back: count received."""
    upload = f"{JOB}/clients/dev-a/update"
    offline = connect_client(port, f"fedgen-server-q-{tag}", clean_session=False, **server_kw)
    subscribe(offline, f"{JOB}/clients/+/update/#")
    offline.disconnect()
    offline.loop_stop()
    device = connect_client(port, f"dev-a-q-{tag}", **device_kw)
    try:
        infos = [device.publish(f"{upload}/{i}", str(i).encode(), qos=1) for i in range(n)]
        infos[-1].wait_for_publish(30)
        assert all(i.is_published() for i in infos)
    finally:
        device.disconnect()
        device.loop_stop()
    back = connect_client(port, f"fedgen-server-q-{tag}", clean_session=False, **server_kw)
    try:
        return _drain(state_of(back), n)
    finally:
        back.disconnect()
        back.loop_stop()


def test_prod_queue_keeps_burst_of_3000_for_offline_server(mosquitto_prod: ProdBroker) -> None:
    pw = mosquitto_prod.passwords
    got = _queue_burst(mosquitto_prod.port, 3000, {"username": "fedgen-server", "password": pw["fedgen-server"]},
                       {"username": "dev-a", "password": pw["dev-a"]}, "prod")
    assert got == 3000


def test_default_max_queued_messages_1000_drops(tmp_path: Path) -> None:
    """Control: with Mosquitto's default limit the same kind of burst IS truncated."""
    text = DEV_CONF.read_text(encoding="utf-8").replace("max_queued_messages 1000000", "max_queued_messages 1000")
    assert "max_queued_messages 1000\n" in text
    conf = tmp_path / "default-queue.conf"
    conf.write_text(text, encoding="utf-8")
    with start_mosquitto(conf, tmp_path / "b") as broker:
        got = _queue_burst(broker.port, 1500, {}, {}, "default")
    print(f"default max_queued_messages 1000: {got} of 1500 queued QoS 1 messages delivered")
    assert 1000 <= got < 1500, got


# ------------------------------------------------------------------------------------ restart


def test_restart_keeps_retained_and_persistent_session_queue(mosquitto_dev: BrokerProcess,
                                                              mqtt_clients: MakeClient) -> None:
    port = mosquitto_dev.port
    pub = connect_client(port, "r-pub")
    publish(pub, f"{JOB}/manifest", b"manifest-v1", retain=True)
    sess = connect_client(port, "r-server", clean_session=False)
    subscribe(sess, f"{JOB}/clients/+/update/#")
    sess.disconnect()
    sess.loop_stop()
    publish(pub, f"{JOB}/clients/dev-a/update/0", b"queued-upload")
    pub.disconnect()
    pub.loop_stop()

    mosquitto_dev.restart()
    assert mosquitto_dev.port == port and mosquitto_dev.running

    back = mqtt_clients(port, "r-server", clean_session=False)
    assert state_of(back).wait_count(1, 5)
    assert state_of(back).messages[0].payload == b"queued-upload"
    late = mqtt_clients(port, "r-late")
    subscribe(late, f"{JOB}/manifest")
    assert state_of(late).wait_count(1, 5)
    assert state_of(late).messages[0].payload == b"manifest-v1"


def test_kill_then_start_again(mosquitto_dev: BrokerProcess, mqtt_clients: MakeClient) -> None:
    mosquitto_dev.kill()
    assert not mosquitto_dev.running
    mosquitto_dev.start()
    assert mqtt_clients(mosquitto_dev.port, "after-kill").is_connected()


# ------------------------------------------------------------------------------------ tooling


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("listener 1883\nthis_is_not_an_option 1\n", encoding="utf-8")
    with pytest.raises(BrokerStartError, match="this_is_not_an_option"):
        start_mosquitto(conf, tmp_path / "b")


def test_embedded_broker_is_the_fallback(tmp_path: Path, mqtt_clients: Callable[..., Client]) -> None:
    with start_broker(prefer="embedded", workdir=tmp_path / "embedded") as broker:
        assert broker.kind == "embedded" and broker.url == f"mqtt://127.0.0.1:{broker.port}"
        mqtt_clients(broker.port, "fallback-probe")
    with start_embedded_broker(workdir=tmp_path / "embedded2", persistence=False) as broker:
        assert broker.running


@pytest.mark.parametrize("bad", ["a/b", "a+b", "a#", "a b", "x" * 65, "", "_lead", "a:b", "$SYS", "dév"])
def test_create_users_rejects_bad_client_ids(tmp_path: Path, bad: str) -> None:
    done = run_create_users(tmp_path / "p", tmp_path / "a", "add-device", bad, "--job", "job1", "--password", "x")
    assert done.returncode == 2 and "invalid client id" in done.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()


def test_create_users_never_writes_clear_passwords(tmp_path: Path) -> None:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    done = run_create_users(passwd, acl, "add-device", "dev-x", "--job", "j2", "--password-stdin", stdin="s3cr3t-pw\n")
    assert done.returncode == 0, done.stderr
    generated = run_create_users(passwd, acl, "add-server")
    printed = generated.stdout.strip().rsplit(" ", 1)[-1]
    assert generated.returncode == 0 and len(printed) >= 24
    for secret in ("s3cr3t-pw", printed):
        assert secret not in acl.read_text() and secret not in passwd.read_text()
        assert secret not in done.stderr + generated.stderr
    assert run_create_users(passwd, acl, "remove-device", "dev-x").returncode == 0
    assert "dev-x" not in passwd.read_text() and "dev-x" not in acl.read_text()



# ------------------------------------------------------------------------------------------------- identities
def test_client_id_is_bound_to_the_user_name(mosquitto_prod: ProdBroker, mqtt_clients: MakeClient) -> None:
    """An authenticated device that asks for another device's client id, or the server's, gets its own user
    name as client id (use_username_as_clientid): the victims stay connected and keep working."""
    victim = _login(mosquitto_prod, mqtt_clients, "dev-b")
    server = _login(mosquitto_prod, mqtt_clients, "fedgen-server")
    subscribe(server, f"{JOB}/clients/+/presence")
    for stolen in ("dev-b", "fedgen-server"):
        attacker = _login(mosquitto_prod, mqtt_clients, "dev-a", client_id=stolen)
        publish(attacker, f"{JOB}/clients/dev-a/presence", f"dev-a as {stolen}".encode())
    assert state_of(server).wait_for(lambda msgs: any(m.payload == b"dev-a as fedgen-server" for m in msgs), 5)
    time.sleep(3 * SETTLE)
    assert victim.is_connected() and server.is_connected()
    publish(victim, f"{JOB}/clients/dev-b/presence", b"dev-b still here")
    assert state_of(server).wait_for(lambda msgs: any(m.payload == b"dev-b still here" for m in msgs), 5)


def test_a_device_cannot_join_the_servers_share_group(mosquitto_prod: ProdBroker, mqtt_clients: MakeClient) -> None:
    """Mosquitto grants any SUBSCRIBE and filters at delivery, so a device that joined the servers' share group
    would get (and drop) a share of the uploads. The group name is a secret of the servers: whatever group a
    device guesses, the servers' group receives every upload and the device none."""
    from server_api.main import share_group
    from server_api.settings import ServerSettings

    group = share_group(ServerSettings(admin_token="an admin token"))
    assert group == share_group(ServerSettings(admin_token="an admin token")) != \
        share_group(ServerSettings(admin_token="another token"))
    assert share_group(ServerSettings(ingest_group="chosen-secret")) == "chosen-secret"
    with pytest.raises(ValueError, match="FEDGEN_INGEST_GROUP"):
        share_group(ServerSettings())
    server = _server(mosquitto_prod, mqtt_clients, "secret-group")
    subscribe(server, f"$share/{group}/{JOB}/clients/+/update/#")
    dev_a = _login(mosquitto_prod, mqtt_clients, "dev-a")
    for guess in ("fedgen-server", "fedgen", "server", "g"):
        subscribe(dev_a, f"$share/{guess}/{JOB}/clients/+/update/#")
    subscribe(dev_a, f"{JOB}/clients/dev-a/ack")
    dev_b = _login(mosquitto_prod, mqtt_clients, "dev-b")
    for i in range(20):
        publish(dev_b, f"{JOB}/clients/dev-b/update/{i}", str(i).encode())
    assert state_of(server).wait_count(20, 10)
    assert sorted(int(m.payload) for m in state_of(server).messages) == list(range(20))
    publish(server, f"{JOB}/clients/dev-a/ack", b"ctl")
    _assert_control_then_absent(dev_a, f"{JOB}/clients/dev-a/ack", [f"{JOB}/clients/dev-b/update/{i}"
                                                                    for i in range(20)])
