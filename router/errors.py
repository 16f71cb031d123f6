"""One error tree: each error carries its HTTP status and a stable code for the JSON body."""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error the router turns into a JSON response."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(RouterError):
    status_code = 400
    code = "bad_request"


class InvalidInput(RouterError):
    """The body parsed but does not fit the model (columns, types, row count)."""

    status_code = 422
    code = "invalid_input"


class PayloadTooLarge(RouterError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(RouterError):
    status_code = 415
    code = "unsupported_media_type"


class Unauthorized(RouterError):
    status_code = 401
    code = "unauthorized"


class NotFound(RouterError):
    status_code = 404
    code = "not_found"


class Conflict(RouterError):
    status_code = 409
    code = "conflict"


class NotReady(RouterError):
    status_code = 503
    code = "not_ready"


class PredictionFailed(RouterError):
    """The champion raised while scoring: a server-side fault, not the client's."""

    status_code = 500
    code = "prediction_failed"


class RegistryUnavailable(RouterError):
    status_code = 503
    code = "registry_unavailable"


class PredictionLogUnavailable(RouterError):
    """The prediction log's database cannot be reached or keeps failing (HTTP 503)."""

    status_code = 503
    code = "prediction_log_unavailable"
