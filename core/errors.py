"""A small flat error hierarchy: who is at fault decides retries and HTTP status.

UserError      bad input; 4xx; never retried.
TransientError a fault that may pass (Redis blip, a 5xx from a generation server); retried with backoff.
FatalError     our bug or a broken deployment; 500; not retried.
"""

from __future__ import annotations


class MiadpoError(Exception):
    """Base of every error the project raises on purpose."""

    status_code = 500
    type = "server_error"

    def __init__(self, message: str, *, code: str = "error", param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param

    def to_dict(self) -> dict[str, str | None]:
        """The error envelope body: {"type", "code", "message", "param"}."""
        return {"type": self.type, "code": self.code, "message": self.message, "param": self.param}


class UserError(MiadpoError):
    """The input is wrong; the user can fix it."""

    status_code = 400
    type = "invalid_request_error"


class InvalidValueError(UserError):
    """A value the schema allows but this deployment or this model does not (422, like schema errors)."""

    status_code = 422


class QuotaError(UserError):
    """The key holds as much as the operator lets one key hold (running jobs, storage)."""

    status_code = 429
    type = "quota_error"


class NotFoundError(UserError):
    """No such resource (or it belongs to another key)."""

    status_code = 404
    type = "not_found_error"


class ConflictError(UserError):
    """The resource is not in a state that allows the call."""

    status_code = 409
    type = "conflict_error"


class TransientError(MiadpoError):
    """A fault that may go away on retry."""

    status_code = 503
    type = "transient_error"


class FatalError(MiadpoError):
    """Not the user's fault and not going away by itself."""

    status_code = 500
    type = "server_error"
