"""One error tree: each error carries its HTTP status and a stable code for the JSON body.

The body is MLflow's scoring-server error (``error_code``, ``message``), so clients of
``mlflow models serve`` read it unchanged, with the router's own ``error`` object beside it::

    {"error_code": "BAD_REQUEST", "message": "...",
     "error": {"code": "bad_request", "message": "..."}}

``error_code`` is one of MLflow's codes (``mlflow.protos.databricks_pb2.ErrorCode``), chosen as
MLflow's server chooses it for the same fault: ``BAD_REQUEST`` for a body it cannot parse,
``INVALID_PARAMETER_VALUE`` for input that does not fit the model's signature or params.

Every message passes through :func:`router.redact.redact`: errors carry registry and driver texts
that embed URIs, and a message reaches responses, logs and CLI output alike.
"""

from __future__ import annotations

from typing import Any

from router.redact import redact


class RouterError(Exception):
    """Base of every error the router turns into a JSON response."""

    status_code = 500
    code = "internal_error"
    error_code = "INTERNAL_ERROR"  # MLflow's code for the same fault
    retry_after_s: int | None = None  # sent as ``Retry-After`` when set

    def __init__(
        self, message: str, *, error_code: str | None = None, retry_after_s: int | None = None
    ) -> None:
        message = redact(message)
        super().__init__(message)
        self.message = message
        if error_code is not None:
            self.error_code = error_code
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str] | None:
        """Response headers the error asks for (``Retry-After``), or None."""
        return None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "error_code": self.error_code,
            "message": self.message,
            "error": {"code": self.code, "message": self.message},
        }


class BadRequest(RouterError):
    """The body cannot be read as the protocol (not JSON, not one format key, not a frame)."""

    status_code = 400
    code = "bad_request"
    error_code = "BAD_REQUEST"


class InvalidInput(RouterError):
    """The body parsed but does not fit the model (columns, types, values, params)."""

    status_code = 400
    code = "invalid_input"
    error_code = "INVALID_PARAMETER_VALUE"


class PayloadTooLarge(RouterError):
    """A body over ``limits.max_body_bytes`` or with more rows than ``limits.max_rows``."""

    status_code = 413
    code = "payload_too_large"
    error_code = "REQUEST_LIMIT_EXCEEDED"


class UnsupportedMediaType(RouterError):
    status_code = 415
    code = "unsupported_media_type"
    error_code = "BAD_REQUEST"


class RequestTimeout(RouterError):
    """The client did not send its whole body in time (``limits.body_read_timeout_s``)."""

    status_code = 408
    code = "request_timeout"
    error_code = "BAD_REQUEST"


class Unauthorized(RouterError):
    status_code = 401
    code = "unauthorized"
    error_code = "UNAUTHENTICATED"


class NotFound(RouterError):
    status_code = 404
    code = "not_found"
    error_code = "RESOURCE_DOES_NOT_EXIST"


class Conflict(RouterError):
    status_code = 409
    code = "conflict"
    error_code = "RESOURCE_CONFLICT"


class NotReady(RouterError):
    status_code = 503
    code = "not_ready"
    error_code = "TEMPORARILY_UNAVAILABLE"


class FeedbackBusy(RouterError):
    """Too many feedback requests already wait for predictions not logged yet (with
    ``Retry-After``): a flood of unknown request ids is refused at once instead of queueing."""

    status_code = 503
    code = "feedback_busy"
    error_code = "TEMPORARILY_UNAVAILABLE"


class TooManyConnections(RouterError):
    """A connection opened beyond ``limits.max_connections`` (answered before the app runs)."""

    status_code = 503
    code = "too_many_connections"
    error_code = "TEMPORARILY_UNAVAILABLE"


class PredictionFailed(RouterError):
    """The champion raised while scoring: a server-side fault, not the client's."""

    status_code = 500
    code = "prediction_failed"


class RegistryUnavailable(RouterError):
    """The model registry cannot be read (HTTP 503; the evaluator's CLI exits 1 with it)."""

    status_code = 503
    code = "registry_unavailable"
    error_code = "TEMPORARILY_UNAVAILABLE"


class PredictionLogUnavailable(RouterError):
    """The prediction log's database cannot be reached or keeps failing (HTTP 503; the
    evaluator's CLI exits 1 with it)."""

    status_code = 503
    code = "prediction_log_unavailable"
    error_code = "TEMPORARILY_UNAVAILABLE"


def http_error_body(status_code: int, code: str, message: str) -> dict[str, Any]:
    """The same body for errors raised outside the tree (Starlette's 404 and 405, a crash)."""
    error_code = {404: "ENDPOINT_NOT_FOUND", 405: "BAD_REQUEST"}.get(
        status_code, "BAD_REQUEST" if status_code < 500 else "INTERNAL_ERROR"
    )
    error = {"code": code, "message": message}
    return {"error_code": error_code, "message": message, "error": error}
