"""Domain errors: what went wrong, in words a client can act on, with the field at fault (`param`) and a
stable `code`. They carry no HTTP status: core.envelope maps each kind to the SPEC's status and error
type, in one place."""


class KiteMeshError(Exception):
    code = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code:
            self.code = code


class InvalidRequest(KiteMeshError):
    code = "invalid_request_error"


class AuthenticationError(KiteMeshError):
    code = "authentication_error"


class InsufficientCredits(KiteMeshError):
    code = "insufficient_credits"


class PermissionDenied(KiteMeshError):
    code = "permission_denied"


class NotFound(KiteMeshError):
    code = "not_found"


class MethodNotAllowed(KiteMeshError):
    code = "method_not_allowed"


class Conflict(KiteMeshError):
    code = "conflict"


class Expired(KiteMeshError):
    code = "approval_expired"


class RequestTooLarge(KiteMeshError):
    code = "request_too_large"


class RateLimited(KiteMeshError):
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds, sent as the Retry-After header


class UpstreamError(KiteMeshError):
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"


class InternalError(KiteMeshError):
    """A failure nobody planned for. Its details go to the log, never to the client."""

    code = "internal_error"

    def __init__(self, message: str = "The server failed to process the request.") -> None:
        super().__init__(message)
