"""The one error envelope every API error is answered in (SPEC §2), and the one place that maps a domain
error (core.errors) to its HTTP status and error type."""

import random
from typing import Any

from django.http import HttpRequest, JsonResponse

from core import errors

# Most specific first: a subclass maps before its base.
_HTTP: list[tuple[type[errors.KiteMeshError], int, str]] = [
    (errors.UpstreamTimeout, 504, "upstream_error"),
    (errors.UpstreamError, 502, "upstream_error"),
    (errors.InvalidRequest, 400, "invalid_request_error"),
    (errors.AuthenticationError, 401, "authentication_error"),
    (errors.InsufficientCredits, 402, "insufficient_credits"),
    (errors.PermissionDenied, 403, "permission_error"),
    (errors.NotFound, 404, "not_found_error"),
    (errors.MethodNotAllowed, 405, "invalid_request_error"),
    (errors.Conflict, 409, "conflict_error"),
    (errors.Expired, 410, "approval_expired"),
    (errors.RequestTooLarge, 413, "invalid_request_error"),
    (errors.RateLimited, 429, "rate_limit_error"),
    (errors.InternalError, 500, "server_error"),
    (errors.KiteMeshError, 400, "invalid_request_error"),
]


def http_status(error: errors.KiteMeshError) -> tuple[int, str]:
    """(HTTP status, error type) of a domain error."""
    return next((status, kind) for cls, status, kind in _HTTP if isinstance(error, cls))


def random_hex(length: int = 24) -> str:
    """A random id for a request or a completion: unique, not secret, so no system call as `secrets` makes."""
    return f"{random.getrandbits(length * 4):0{length}x}"


def request_id_new() -> str:
    return "req_" + random_hex()


def request_id_of(request: HttpRequest) -> str:
    request_id = getattr(request, "kitemesh_request_id", None)
    if request_id is None:
        request_id = request.kitemesh_request_id = request_id_new()
    return request_id


def error_record(error: errors.KiteMeshError) -> dict:
    """The error as an execution keeps it (and GET /v1/executions shows it)."""
    status, kind = http_status(error)
    return {"status": status, "type": kind, "code": error.code, "message": error.message}


def error_body(error: errors.KiteMeshError, request_id: str) -> dict:
    body: dict[str, Any] = {"message": error.message, "type": http_status(error)[1], "code": error.code}
    if error.param is not None:
        body["param"] = error.param
    body["request_id"] = request_id
    return {"error": body}


def error_headers(error: errors.KiteMeshError) -> dict[str, str]:
    headers = {}
    if isinstance(error, errors.AuthenticationError):
        headers["WWW-Authenticate"] = 'Bearer realm="kitemesh"'
    if isinstance(error, errors.RateLimited):
        headers["Retry-After"] = str(error.retry_after)
    return headers


def error_response(error: errors.KiteMeshError, request: HttpRequest) -> JsonResponse:
    """The envelope as a Django response, with X-Request-ID and the error's headers."""
    request_id = request_id_of(request)
    response = JsonResponse(error_body(error, request_id), status=http_status(error)[0])
    response["X-Request-ID"] = request_id
    for name, value in error_headers(error).items():
        response[name] = value
    return response
