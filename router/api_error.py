"""``ApiError``: the one typed failure of the router's front door, and how each API spells it.

Lifecycle: validation, admission, auth and the frontend raise ``ApiError(kind, message, param=)``;
each surface turns it into its own shape at the edge and nowhere else:
- OpenAI REST: ``openai_body`` -> ``{"error": {"message", "type", "param", "code"}}`` with
  ``kind.http_status``, 401 included (vLLM answers 401 with a flat ``{"error": "Unauthorized"}``;
  the OpenAI SDK reads the nested shape, so every status uses it here);
- Anthropic REST: ``anthropic_body`` -> ``{"type": "error", "error": {"type", "message"}, "request_id"}``
  with ``kind.anthropic_status`` (overload and unavailability are 529 ``overloaded_error``);
- gRPC: ``kind.grpc_code``.
Messages are built by us (never ``str()`` of a library exception: no paths, no stack traces) and
capped at ``MAX_MESSAGE_CHARS``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import grpc

MAX_MESSAGE_CHARS = 1000
# host:port and gRPC's "ipv4:1.2.3.4:5678" in text that came from a worker or a gRPC library
_ADDRESS = re.compile(r"(?:ipv[46]:)?(?:\[[0-9A-Fa-f:.%]+\]|[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)+|localhost):\d{2,5}\b")


class ErrorKind(enum.Enum):
    #            (HTTP, OpenAI type, Anthropic type, gRPC code)
    INVALID = (400, "invalid_request_error", "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT)
    UNAUTHENTICATED = (401, "authentication_error", "authentication_error", grpc.StatusCode.UNAUTHENTICATED)
    NOT_FOUND = (404, "not_found_error", "not_found_error", grpc.StatusCode.NOT_FOUND)
    TOO_LARGE = (413, "invalid_request_error", "request_too_large", grpc.StatusCode.INVALID_ARGUMENT)
    OVERLOADED = (429, "rate_limit_error", "overloaded_error", grpc.StatusCode.RESOURCE_EXHAUSTED)
    INTERNAL = (500, "internal_server_error", "api_error", grpc.StatusCode.INTERNAL)
    UNAVAILABLE = (503, "service_unavailable", "overloaded_error", grpc.StatusCode.UNAVAILABLE)
    TIMEOUT = (504, "timeout", "api_error", grpc.StatusCode.DEADLINE_EXCEEDED)

    @property
    def http_status(self) -> int:
        return int(self.value[0])

    @property
    def anthropic_status(self) -> int:
        """Anthropic answers overload with 529 (its SDKs retry it, honouring ``retry-after``)."""
        return 529 if self in (ErrorKind.OVERLOADED, ErrorKind.UNAVAILABLE) else self.http_status

    @property
    def openai_type(self) -> str:
        return str(self.value[1])

    @property
    def anthropic_type(self) -> str:
        return str(self.value[2])

    @property
    def grpc_code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self.value[3]
        return code


@dataclass
class ApiError(Exception):
    kind: ErrorKind
    message: str
    param: str | None = None  # the offending field, dotted (``messages.2.content``)
    retry_after_s: int | None = None  # OVERLOADED / UNAVAILABLE: the Retry-After header

    def __post_init__(self) -> None:
        if len(self.message) > MAX_MESSAGE_CHARS:
            self.message = self.message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(self.message)

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind.openai_type,
                "param": self.param,
                "code": self.kind.http_status,
            }
        }

    def anthropic_body(self, request_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": "error", "error": {"type": self.kind.anthropic_type, "message": self.message}}
        if request_id:
            body["request_id"] = request_id
        return body

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)} if self.retry_after_s is not None else {}


def public_text(text: str) -> str:
    """``text`` without internal addresses (worker or library messages shown to clients, S11)."""
    return _ADDRESS.sub("<internal>", text)


def invalid(param: str, reason: str) -> ApiError:
    """A 400 naming the field: ``"max_tokens: must be at least 1"``."""
    return ApiError(ErrorKind.INVALID, f"{param}: {reason}", param=param)
