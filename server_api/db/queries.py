"""Named queries of the round server's database, shared by the REST API and the round engine.

Each takes an open `Session` and neither commits nor opens transactions: the caller decides the unit of work
(`server_api.db.engine.in_transaction`, or a request's session).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Row, Select, case, func, literal_column, select
from sqlalchemy.orm import Session

from server_api.db.models import (
    Client,
    ClientStatus,
    ClientUpdate,
    Job,
    JobStatus,
    ModelVersion,
    Round,
    RoundStatus,
    UpdateStatus,
)

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------- jobs
def job_exists(session: Session, job_id: str) -> bool:
    return session.scalar(select(Job.id).where(Job.id == job_id)) is not None


def jobs_page(session: Session, limit: int, offset: int) -> tuple[int, Sequence[Job]]:
    """(total, jobs newest first)."""
    total = session.scalar(select(func.count()).select_from(Job)) or 0
    jobs = session.scalars(select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return total, jobs


def unfinished_job_ids(session: Session) -> list[str]:
    return list(session.scalars(select(Job.id).where(Job.status.in_([JobStatus.CREATED, JobStatus.RUNNING,
                                                                     JobStatus.PAUSED]))))


def count_running_jobs(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.RUNNING)) or 0


# ------------------------------------------------------------------------------------------------- versions
def latest_version(session: Session, job_id: str) -> ModelVersion | None:
    """The job's newest model version (the one its devices train from next)."""
    return session.scalars(select(ModelVersion).where(ModelVersion.job_id == job_id)
                           .order_by(ModelVersion.version.desc()).limit(1)).first()


def latest_version_numbers(session: Session, job_ids: Sequence[str]) -> dict[str, int]:
    """job id -> its newest model version number, for jobs that have one."""
    if not job_ids:
        return {}
    rows = session.execute(select(ModelVersion.job_id, func.max(ModelVersion.version))
                           .where(ModelVersion.job_id.in_(list(job_ids))).group_by(ModelVersion.job_id))
    return {job_id: version for job_id, version in rows}


# ------------------------------------------------------------------------------------------------- rounds
def rounds_page(session: Session, job_id: str, limit: int, offset: int) -> tuple[int, Sequence[Round]]:
    """(total, round attempts by index then attempt)."""
    where = Round.job_id == job_id
    total = session.scalar(select(func.count()).select_from(Round).where(where)) or 0
    rows = session.scalars(select(Round).where(where).order_by(Round.index, Round.attempt)
                           .limit(limit).offset(offset)).all()
    return total, rows


def round_attempts(session: Session, job_id: str, index: int) -> Sequence[Round]:
    return session.scalars(select(Round).where(Round.job_id == job_id, Round.index == index)
                           .order_by(Round.attempt)).all()


def attempt_count(session: Session, job_id: str, index: int) -> int:
    return session.scalar(select(func.count()).select_from(Round).where(
        Round.job_id == job_id, Round.index == index)) or 0


def unfinished_round(session: Session, job_id: str, index: int) -> Round | None:
    """The attempt of round `index` that was open (or aggregating) when the server stopped, if any."""
    return session.scalars(select(Round).where(
        Round.job_id == job_id, Round.index == index,
        Round.status.in_([RoundStatus.OPEN, RoundStatus.AGGREGATING]))).first()


def round_id_of(session: Session, job_id: str, index: int, attempt: int) -> int | None:
    return session.scalar(select(Round.id).where(Round.job_id == job_id, Round.index == index,
                                                 Round.attempt == attempt))


def latest_round_id(session: Session, job_id: str) -> int | None:
    return session.scalar(select(func.max(Round.id)).where(Round.job_id == job_id))


# ------------------------------------------------------------------------------------------------- updates
def updates_of_rounds(session: Session, round_ids: Sequence[int]) -> Sequence[ClientUpdate]:
    return session.scalars(select(ClientUpdate).where(ClientUpdate.round_id.in_(list(round_ids)))
                           .order_by(ClientUpdate.received_at, ClientUpdate.id)).all()


def accepted_updates(session: Session, round_id: int) -> Sequence[ClientUpdate]:
    return session.scalars(select(ClientUpdate).where(ClientUpdate.round_id == round_id,
                                                      ClientUpdate.status == UpdateStatus.ACCEPTED)
                           .order_by(ClientUpdate.id)).all()


def accepted_clients(session: Session, round_id: int) -> set[str]:
    """The clients with an accepted update in the round (whichever server process accepted it)."""
    return set(session.scalars(select(ClientUpdate.client_id).where(
        ClientUpdate.round_id == round_id, ClientUpdate.status == UpdateStatus.ACCEPTED)).all())


def round_status_for_share(session: Session, round_id: int) -> RoundStatus | None:
    """The round's status, its row locked against change until the transaction ends (FOR SHARE on
    PostgreSQL; SQLite serialises writers anyway): updates accepted in this transaction reach the round
    before whoever closes it reads them."""
    return session.scalar(select(Round.status).where(Round.id == round_id).with_for_update(read=True))


def update_by_key(session: Session, job_id: str, key: str) -> ClientUpdate | None:
    return session.scalars(select(ClientUpdate).where(ClientUpdate.job_id == job_id,
                                                      ClientUpdate.idempotency_key == key)).first()


def _where_in(session: Session, query: Select[tuple[T]], column: Any, values: Sequence[str]) -> list[T]:
    """The rows of `query` whose `column` is one of `values` (distinct), asked 500 at a time: a bounded number
    of bind parameters."""
    found: list[T] = []
    values = list(dict.fromkeys(values))
    for start in range(0, len(values), 500):
        found += session.scalars(query.where(column.in_(values[start:start + 500]))).all()
    return found


def updates_by_keys(session: Session, job_id: str, keys: Sequence[str]) -> list[ClientUpdate]:
    """The job's updates with these idempotency keys."""
    return _where_in(session, select(ClientUpdate).where(ClientUpdate.job_id == job_id),
                     ClientUpdate.idempotency_key, keys)


# ------------------------------------------------------------------------------------------------- clients
def clients_by_ids(session: Session, job_id: str, client_ids: Sequence[str]) -> list[Client]:
    """The job's client rows with these ids."""
    return _where_in(session, select(Client).where(Client.job_id == job_id), Client.client_id, client_ids)


def clients_page(session: Session, job_id: str | None, limit: int, offset: int) -> tuple[int, Sequence[Client]]:
    query, count = select(Client), select(func.count()).select_from(Client)
    if job_id is not None:
        query, count = query.where(Client.job_id == job_id), count.where(Client.job_id == job_id)
    total = session.scalar(count) or 0
    return total, session.scalars(query.order_by(Client.job_id, Client.client_id).limit(limit).offset(offset)).all()


def online_clients(session: Session, job_id: str) -> Sequence[Client]:
    return session.scalars(select(Client).where(Client.job_id == job_id,
                                                Client.status == ClientStatus.ONLINE)).all()


def clients_of_job(session: Session, job_id: str) -> Sequence[Client]:
    return session.scalars(select(Client).where(Client.job_id == job_id)).all()


# ------------------------------------------------------------------------------------------------- dashboard
# GET /jobs/{id}/dashboard: bounded aggregates, grouped in SQL so that the answer stays small and fast.
ROUND_SERIES_COLUMNS = (Round.index, Round.attempt, Round.status, Round.started_at, Round.closed_at,
                        Round.accuracy, Round.loss, Round.generator_loss, Round.bytes_up, Round.bytes_down,
                        Round.num_updates, Round.model_version, Round.failure_reason)


def recent_round_series(session: Session, job_id: str, limit: int) -> tuple[int, Sequence[Row[Any]]]:
    """(total attempts, the latest `limit` attempts oldest first) as rows of `ROUND_SERIES_COLUMNS` (no
    selected list: it can be long and the curves don't need it)."""
    total = session.scalar(select(func.count()).select_from(Round).where(Round.job_id == job_id)) or 0
    latest = (select(*ROUND_SERIES_COLUMNS).where(Round.job_id == job_id)
              .order_by(Round.index.desc(), Round.attempt.desc()).limit(limit))
    return total, list(reversed(session.execute(latest).all()))


def latest_round(session: Session, job_id: str) -> Round | None:
    """The job's latest round attempt (highest index, then attempt): the one the dashboard shows as current."""
    return session.scalars(select(Round).where(Round.job_id == job_id)
                           .order_by(Round.index.desc(), Round.attempt.desc()).limit(1)).first()


def _reason_code(session: Session) -> ColumnElement[str]:
    """An update's reason code: the text of ``reason`` ("code: message") before its first ':', or
    ``unknown`` when it has none. Constants are literal SQL so that PostgreSQL sees the GROUP BY expression as
    the selected one."""
    reason = func.coalesce(ClientUpdate.reason, literal_column("'unknown'"))
    colon = literal_column("':'")
    if session.get_bind().dialect.name == "postgresql":
        return func.split_part(reason, colon, literal_column("1"))
    at = func.instr(reason, colon)
    return case((at > literal_column("0"), func.substr(reason, literal_column("1"), at - literal_column("1"))),
                else_=reason)


def round_status_counts(session: Session, round_id: int) -> Sequence[Row[Any]]:
    """(status, reason code, count) of the updates of one round attempt."""
    code = _reason_code(session)
    return session.execute(select(ClientUpdate.status, code, func.count())
                           .where(ClientUpdate.round_id == round_id)
                           .group_by(ClientUpdate.status, code)).all()


def round_client_statuses(session: Session, round_id: int, client_ids: Sequence[str]) -> dict[str, set[str]]:
    """client id -> the statuses (``accepted`` / ``rejected``) of its updates in one round attempt, for the
    given clients."""
    if not client_ids:
        return {}
    rows = session.execute(select(ClientUpdate.client_id, ClientUpdate.status).distinct()
                           .where(ClientUpdate.round_id == round_id, ClientUpdate.client_id.in_(list(client_ids))))
    statuses: dict[str, set[str]] = {}
    for client_id, status in rows:
        statuses.setdefault(client_id, set()).add(UpdateStatus(status).value)
    return statuses


def rejections_by_client(session: Session, job_id: str, client_ids: Sequence[str]) -> Sequence[Row[Any]]:
    """(client id, reason code, count) of the rejected updates of the given clients, across the job."""
    if not client_ids:
        return []
    code = _reason_code(session)
    return session.execute(select(ClientUpdate.client_id, code, func.count())
                           .where(ClientUpdate.job_id == job_id, ClientUpdate.status == UpdateStatus.REJECTED,
                                  ClientUpdate.client_id.in_(list(client_ids)))
                           .group_by(ClientUpdate.client_id, code)).all()


def latest_accepted_label_counts(session: Session, job_id: str, client_ids: Sequence[str]) -> dict[str, list[int]]:
    """client id -> the label counts of its latest accepted update in the job, for the given clients."""
    if not client_ids:
        return {}
    latest = (select(func.max(ClientUpdate.id).label("id"))
              .where(ClientUpdate.job_id == job_id, ClientUpdate.status == UpdateStatus.ACCEPTED,
                     ClientUpdate.client_id.in_(list(client_ids)))
              .group_by(ClientUpdate.client_id).subquery())
    rows = session.execute(select(ClientUpdate.client_id, ClientUpdate.label_counts)
                           .join(latest, ClientUpdate.id == latest.c.id))
    return {client_id: list(counts or []) for client_id, counts in rows}
