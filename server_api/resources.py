"""Files the server ships besides code: the Alembic migrations and the broker configs.

In a checkout they are the top-level folders ``migrations/`` and ``broker/``; an installed wheel carries them
as ``server_api/migrations/`` and ``server_api/broker/`` (setup.py maps them). `shipped_dir` finds either.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """The folder `name` ("migrations" or "broker") of the installed package or of the checkout."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{name}/ is neither in {PACKAGE_DIR} nor in {PACKAGE_DIR.parent}: a broken install?")


def dev_broker_config() -> Path:
    """broker/mosquitto/dev.conf."""
    return shipped_dir("broker") / "mosquitto" / "dev.conf"
