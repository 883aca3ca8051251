"""Settings of the round server, read from ``FEDGEN_*`` environment variables (or passed in code).

===========================  =========================  ========================================
Variable                     Default                    Meaning
===========================  =========================  ========================================
``FEDGEN_DATABASE_URL``      ``sqlite:///fedgen.db``    SQLAlchemy URL (docs/database.md)
``FEDGEN_BROKER_URL``        ``mqtt://127.0.0.1:1883``  MQTT broker (``mqtts://``: TLS)
``FEDGEN_BROKER_USERNAME``   unset                      broker user name
``FEDGEN_BROKER_PASSWORD``   unset                      broker password (secret)
``FEDGEN_BROKER_TLS_CA``     unset                      CA certificate file of the broker
``FEDGEN_ADMIN_TOKEN``       unset                      token of the write endpoints (secret)
``FEDGEN_ARTIFACT_DIR``      ``./fedgen-artifacts``     root of the artifact store
``FEDGEN_HOST``              ``127.0.0.1``              where the REST API listens
``FEDGEN_PORT``              ``8000``                   its port
``FEDGEN_MAX_UPLOAD_BYTES``  16 MiB                     largest request body / client upload
``FEDGEN_DATA_DIR``          unset                      datasets (server-side evaluation)
``FEDGEN_CLIENT_ID``         ``fedgen-server``          MQTT client id (one per server process)
``FEDGEN_INGEST_GROUP``      unset                      secret share group (``--shared-subscription``)
``FEDGEN_PARTITION_RELEASE_S`` 600                      a partition index of a device offline this long is free
``FEDGEN_LEASE_S``           10                         a job's lease (``--shared-subscription``): another
                                                        process runs its rounds this long after the holder died
===========================  =========================  ========================================

Without an admin token the write endpoints answer 503.

Secrets (:class:`pydantic.SecretStr`) print as ``**********``, and passwords inside the database and broker
URLs are masked in ``repr``/``str``, so a settings object can be logged (``model_dump()`` still holds the
URLs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from server_api.db.engine import database_url as resolve_database_url
from server_api.db.engine import normalise_url
from shared.protocol.ids import ID_REGEX

DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024


def _default_database_url() -> str:
    return resolve_database_url(None)


def mask_url_password(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``; unparseable URLs are masked entirely."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # never leak a malformed URL that may hold a password
        return "<unparseable URL>"


class ServerSettings(BaseSettings):
    """Configuration of the round server and its REST API (environment prefix ``FEDGEN_``)."""

    model_config = SettingsConfigDict(env_prefix="FEDGEN_", extra="ignore", validate_default=True)

    database_url: str = Field(default_factory=_default_database_url, repr=False)
    broker_url: str = Field(default="mqtt://127.0.0.1:1883", repr=False)
    broker_username: str | None = None
    broker_password: SecretStr | None = None
    broker_tls_ca: Path | None = None
    admin_token: SecretStr | None = None
    artifact_dir: Path = Path("./fedgen-artifacts")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_upload_bytes: int = Field(default=DEFAULT_MAX_UPLOAD_BYTES, ge=1)
    data_dir: Path | None = None
    client_id: str = Field(default="fedgen-server", pattern=ID_REGEX)
    ingest_group: SecretStr | None = None
    partition_release_s: float = Field(default=600.0, ge=0, le=10**7)
    # several server processes (--shared-subscription): how long a job's lease lasts unless renewed (every
    # third of it); a process that died is replaced after at most about this long (docs/scaling.md)
    lease_s: float = Field(default=10.0, ge=1.0, le=3600.0)
    # messages the broker has delivered and the server not yet handled, at most (about: Mosquitto may add one
    # in-flight window); the broker holds the rest (docs/scaling.md, "A bounded inbox"). 0: unbounded
    max_backlog: int = Field(default=1000, ge=0, le=10**6)

    @field_validator("database_url")
    @classmethod
    def _normalise_database_url(cls, value: str) -> str:
        return normalise_url(value)

    @field_validator("broker_username", "broker_password", "admin_token", "broker_tls_ca", "data_dir",
                     "ingest_group", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """An empty variable (``FEDGEN_ADMIN_TOKEN=``) means "not set", never "the empty token"."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @property
    def database_url_masked(self) -> str:
        """The database URL with its password hidden, for logs."""
        return mask_url_password(self.database_url)

    def __repr_args__(self) -> Any:
        yield "database_url", self.database_url_masked
        yield "broker_url", mask_url_password(self.broker_url)
        yield from super().__repr_args__()
