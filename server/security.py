"""Request checks that need no model: the API key and what a file really is (by its bytes, not its claim)."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

IMAGE_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"BM", "image/bmp"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
)
"""(offset, magic bytes, media type) of the photo formats the server accepts; WebP is checked apart."""
ACCEPTED = "JPEG, PNG, WebP, GIF, BMP or TIFF"


class AuthError(Exception):
    """A request without the right API key: `status` is 401 (no key given) or 403 (a wrong key)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def sniff_image(data: bytes) -> str | None:
    """The media type of a photo judged by its first bytes, or None when it is no format we accept."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for offset, magic, media_type in IMAGE_SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            return media_type
    return None


def check_key(expected: str | None, given: str | None) -> None:
    """Pass when no key is configured or `given` equals it (constant-time); else raise AuthError 401/403."""
    if expected is None:
        return
    if given is None:
        raise AuthError(401, "this request needs an API key: send it in the X-API-Key header "
                             "(or Authorization: Bearer <key>)")
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise AuthError(403, "the API key is not valid for this server")


class BodyLimit:
    """ASGI middleware: refuse a request body above `limit` bytes with 413 and a JSON message.

    A declared Content-Length above the limit is refused before a byte is read; a body that grows past it
    while streaming is cut off, and whatever the app would have answered is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _response(self) -> JSONResponse:
        return JSONResponse({"detail": f"the request body is larger than this server's limit of {self.limit:,} bytes "
                                       f"(CONCORD_MAX_REQUEST_BYTES); send fewer or smaller photos per request"},
                            status_code=413, headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._response()(scope, receive, send)
            return
        total = 0
        exceeded = started = replaced = False

        async def limited_receive() -> Message:
            nonlocal total, exceeded
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.limit:
                    exceeded = True
                    raise BodyTooLarge(f"request body above {self.limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started, replaced
            if exceeded and not started:  # answer 413 instead of the app's own error about the cut-off body
                if not replaced:
                    replaced = True
                    await self._response()(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded or started:
                raise
            if not replaced:
                await self._response()(scope, receive, send)


class BodyTooLarge(Exception):
    """Raised inside the app when the streamed body passes the limit (BodyLimit turns it into 413)."""
