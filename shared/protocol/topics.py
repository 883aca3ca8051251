"""Topic names of the MQTT protocol (docs/protocol.md). Only MQTT 3.1.1 features are used: QoS 1, retained
messages, last will, persistent sessions."""

from __future__ import annotations

from shared.protocol.ids import check_id, is_valid_id

PROTOCOL_VERSION = 1
ROOT = f"fedgen/v{PROTOCOL_VERSION}"


class Topics:
    """Topic names of one job."""

    def __init__(self, job: str):
        check_id(job, "job")
        self.job = job
        self.base = f"{ROOT}/{job}"

    @property
    def round(self) -> str:  # retained, server -> all
        return f"{self.base}/round"

    @property
    def manifest(self) -> str:  # retained, server -> all
        return f"{self.base}/manifest"

    def artifact_chunk(self, sha256: str, index: int) -> str:  # retained, server -> all
        return f"{self.base}/artifacts/{sha256}/{index}"

    def artifact_chunks(self, sha256: str) -> str:
        return f"{self.base}/artifacts/{sha256}/+"

    def presence(self, client: str) -> str:  # retained, client -> server (last will: offline)
        return f"{self.base}/clients/{client}/presence"

    def update(self, client: str) -> str:  # client -> server
        return f"{self.base}/clients/{client}/update"

    def ack(self, client: str) -> str:  # server -> client
        return f"{self.base}/clients/{client}/ack"

    def assignment(self, client: str) -> str:  # retained, server -> client: its partition index (index=auto)
        return f"{self.base}/clients/{client}/assignment"

    def forwarded(self, client: str) -> str:  # server -> the server running the job's rounds
        """A chunk of a multi-chunk upload from `client`, passed on by a server process that does not run the
        job's rounds to the one that does (docs/scaling.md): only server identities may use servers/..."""
        return f"{self.base}/servers/chunks/{client}"

    def forwarded_from(self, topic: str) -> str | None:
        """The client of a servers/chunks/<id> topic of this job, or None."""
        prefix = f"{self.base}/servers/chunks/"
        if topic.startswith(prefix):
            client = topic[len(prefix):]
            return client if is_valid_id(client) else None
        return None

    @property
    def all_presence(self) -> str:
        return f"{self.base}/clients/+/presence"

    @property
    def all_updates(self) -> str:
        return f"{self.base}/clients/+/update"

    def client_of(self, topic: str) -> str | None:
        """The client id in a clients/<id>/... topic of this job, or None (also when the id is not a valid id)."""
        parts = topic.split("/")
        prefix = self.base.split("/")
        if len(parts) == len(prefix) + 3 and parts[: len(prefix)] == prefix and parts[len(prefix)] == "clients":
            client = parts[len(prefix) + 1]
            return client if is_valid_id(client) else None
        return None


def job_of(topic: str) -> str | None:
    """The job id of a topic under the protocol root, or None (also when it is not a valid id)."""
    parts = topic.split("/")
    root = ROOT.split("/")
    if len(parts) <= len(root) or parts[: len(root)] != root:
        return None
    return parts[len(root)] if is_valid_id(parts[len(root)]) else None
