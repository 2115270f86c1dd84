"""Errors that reach API clients. Each carries its place in the SPEC's error table; chat.wire renders
them into the one error envelope."""


class ApiError(Exception):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code:
            self.code = code


class InvalidRequest(ApiError):
    pass


class AuthenticationError(ApiError):
    status = 401
    type = "authentication_error"
    code = "authentication_error"


class InsufficientCredits(ApiError):
    status = 402
    type = "insufficient_credits"
    code = "insufficient_credits"


class PermissionDenied(ApiError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(ApiError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class Gone(ApiError):
    status = 410
    type = "approval_expired"
    code = "approval_expired"


class RequestTooLarge(ApiError):
    status = 413
    code = "request_too_large"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds, sent as the Retry-After header


class UpstreamError(ApiError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class InternalError(ApiError):
    """A failure nobody planned for. Its details go to the log, never to the client."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str = "The server failed to process the request.") -> None:
        super().__init__(message)
