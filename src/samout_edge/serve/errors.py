"""The one error a request is refused with: ``ApiError(message, status, code)``.

Every refusal the server makes (a field it does not do, a prompt too long, a full
store, a busy session) raises it, and one exception handler (serve/http.py) answers it
as OpenAI does: ``{"error": {"message", "type", "code"}}`` with its status, the type
``invalid_request_error`` for a 4xx (the request's fault) and ``server_error`` for a
5xx. Session refusals are its subclass ``SessionError`` (serve/sessions.py). No FastAPI
here: the session table and the tokenizer child raise it too.
"""

from __future__ import annotations

from typing import Any

from samout_edge.errors import SamoutError


class ApiError(SamoutError):
    """A request refused (or failed) with ``status`` and OpenAI's ``code``."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.code = status, code

    @property
    def kind(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "code": self.code}}


def unsupported(name: str, hint: str = "leave it out, or at its default") -> ApiError:
    """The refusal of a field this server does not do, by name (never silence)."""
    return ApiError(f"{name} is not supported by this server ({hint})", 400, "unsupported_parameter")


def refuse_unsupported(request: Any) -> None:
    """Raise ``unsupported`` for the first field ``request.unsupported()`` names, if any."""
    name = request.unsupported()
    if name is not None:
        raise unsupported(name)
