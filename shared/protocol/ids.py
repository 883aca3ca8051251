"""The one id pattern of the project: job ids and client (device) ids, in topics, paths, URLs and columns.

1 to 63 characters of ASCII letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit: safe as an
MQTT topic level (no ``/``, ``+``, ``#``), as a file name (never ``.`` or ``..``), in a URL path, and as a DNS
label (so ``--client-id auto`` can use a host name). 63 fits every id column (``jobs.id`` is VARCHAR(63)).
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from shared.protocol.errors import ValidationError

MAX_ID_LENGTH = 63
ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# for re.search-style matchers (msgspec): \Z, since "$" also matches before a final newline
_ANCHORED = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z"
ID_PATTERN = re.compile(_ANCHORED)

Id = Annotated[str, msgspec.Meta(pattern=_ANCHORED, min_length=1, max_length=MAX_ID_LENGTH,
                                 description="1-63 of A-Z a-z 0-9 . _ -, starting with a letter or digit")]


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.search(value) is not None


def check_id(value: object, what: str) -> str:
    """`value` if it is a valid id, else ValidationError('bad_id')."""
    if not is_valid_id(value):
        shown = value[:80] if isinstance(value, str) else value
        raise ValidationError("bad_id", f"{what} id {shown!r} must be 1-{MAX_ID_LENGTH} characters of "
                                        "A-Z a-z 0-9 . _ -, starting with a letter or digit")
    return value  # type: ignore[return-value]
