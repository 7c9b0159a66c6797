"""Every error a necrod client or handler can meet, and how each travels over JSON-RPC.

The tree::

    NecrodError                      kind (stable string)   JSON-RPC code
    ├── ParseError                   parse_error            -32700
    ├── InvalidRequest               invalid_request        -32600
    ├── MethodNotFound               method_not_found       -32601
    ├── InvalidParams                invalid_params         -32602
    ├── Internal                     internal               -32603
    ├── UnsupportedProtocol          unsupported_protocol   -32001
    ├── PermissionDenied             permission_denied      -32002
    ├── NotFound                     not_found              -32004
    ├── AlreadyExists                already_exists         -32005
    ├── FailedPrecondition           failed_precondition    -32006
    ├── ResourceExhausted            resource_exhausted     -32007
    ├── Unavailable                  unavailable            -32008
    ├── DeadlineExceeded             deadline_exceeded      -32009
    ├── Aborted                      aborted                -32010
    └── DaemonUnreachable            (client side only: no daemon answered)
        └── ReplyTimeout             (client side only: no reply in the client's time)

Handlers raise these; the server turns them into error objects whose ``data.kind`` is the
stable string scripts match on. Clients turn error objects back into the same classes.
"""

from __future__ import annotations

from typing import Any, ClassVar


class NecrodError(Exception):
    """Base of every error necrod reports; ``kind`` is the stable name scripts match on."""

    kind: ClassVar[str] = "internal"
    code: ClassVar[int] = -32603

    def __init__(self, message: str, /, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_error_object(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "data": {"kind": self.kind, **self.data}}


class ParseError(NecrodError):
    """The request line is not valid UTF-8 JSON."""

    kind = "parse_error"
    code = -32700


class InvalidRequest(NecrodError):
    """The line is JSON but not an acceptable JSON-RPC 2.0 request."""

    kind = "invalid_request"
    code = -32600


class MethodNotFound(NecrodError):
    """No method of that name."""

    kind = "method_not_found"
    code = -32601


class InvalidParams(NecrodError):
    """A parameter is missing, unknown, of the wrong type or out of range."""

    kind = "invalid_params"
    code = -32602


class Internal(NecrodError):
    """A bug or an unexpected failure inside the daemon."""

    kind = "internal"
    code = -32603


class UnsupportedProtocol(NecrodError):
    """The client asked for a protocol version this daemon does not speak."""

    kind = "unsupported_protocol"
    code = -32001


class PermissionDenied(NecrodError):
    """The peer is not allowed to talk to this daemon, or to do this."""

    kind = "permission_denied"
    code = -32002


class NotFound(NecrodError):
    """The pool, slot, lease, task or ref named does not exist."""

    kind = "not_found"
    code = -32004


class AlreadyExists(NecrodError):
    """The thing to create exists already."""

    kind = "already_exists"
    code = -32005


class FailedPrecondition(NecrodError):
    """The request is well formed but the state does not allow it (a stale lease, say)."""

    kind = "failed_precondition"
    code = -32006


class ResourceExhausted(NecrodError):
    """No free slot, too many connections, or another limit reached."""

    kind = "resource_exhausted"
    code = -32007


class Unavailable(NecrodError):
    """The daemon cannot do it now (draining pool, store failure, shutting down); retry later."""

    kind = "unavailable"
    code = -32008


class DeadlineExceeded(NecrodError):
    """The operation did not finish in the time allowed."""

    kind = "deadline_exceeded"
    code = -32009


class Aborted(NecrodError):
    """The operation was interrupted by a concurrent change."""

    kind = "aborted"
    code = -32010


class DaemonUnreachable(NecrodError):
    """No daemon answered at the socket (client side only; never sent over the wire)."""

    kind = "unreachable"
    code = 0


class ReplyTimeout(DaemonUnreachable):
    """No reply came within the client's timeout (client side only): the call may still complete."""

    kind = "timeout"


ERROR_CLASSES: dict[str, type[NecrodError]] = {
    cls.kind: cls
    for cls in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        Internal,
        UnsupportedProtocol,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Aborted,
    )
}

#: The closed set of kinds the daemon may send.
ERROR_KINDS = frozenset(ERROR_CLASSES)


def error_from_object(obj: object) -> NecrodError:
    """Rebuild the exception a JSON-RPC error object stands for (client side)."""
    if not isinstance(obj, dict):
        return Internal(f"malformed error object from daemon: {obj!r}")
    message = obj.get("message")
    data = obj.get("data")
    kind = data.get("kind") if isinstance(data, dict) else None
    cls = ERROR_CLASSES.get(kind, Internal) if isinstance(kind, str) else Internal
    extra = {k: v for k, v in data.items() if k != "kind"} if isinstance(data, dict) else {}
    return cls(str(message) if message is not None else kind or "unknown error", **extra)
