"""The one error every decoder of received bytes raises."""

from __future__ import annotations


class ValidationError(ValueError):
    """A received payload was refused; `reason` is a short machine-readable code, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message
