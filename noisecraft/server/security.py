"""Authentication, request-size limits, error answers, and safe decoding of request data.

* :class:`GuardMiddleware` (pure ASGI, so it also covers websockets): checks credentials when
  auth is configured and refuses bodies over ``limits.max_body_bytes`` with 413, counting the
  bytes actually received (a lying ``Content-Length`` does not get past it).
* :func:`install_error_handlers`: every error is JSON ``{"error": {"type", "message"},
  "detail": message}``; an unexpected exception becomes a 500 naming its type, never a
  traceback.
* :func:`decode_image`: base64 or bytes -> PIL image, refusing anything over the pixel limit
  *before* decoding the pixels (a decompression bomb never gets allocated).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError

from noisecraft.server.config import Auth, Limits

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})


class RequestError(HTTPException):
    """A 4xx answer whose message says what was wrong (``kind`` is a short machine name)."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request") -> None:
        super().__init__(status_code=status, detail=message)
        self.kind = kind


def error_body(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "details": "", "extra_info": {}},
            "detail": message, **extra}


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def check_credentials(auth: Auth, authorization: str | None, api_key: str | None,
                      query_token: str | None = None) -> bool:
    if not auth.enabled:
        return True
    if auth.api_key is not None:
        for given in (api_key, query_token):
            if given and hmac.compare_digest(given.encode(), auth.api_key.encode()):
                return True
        if authorization and authorization.lower().startswith("bearer "):
            if hmac.compare_digest(authorization[7:].strip().encode(), auth.api_key.encode()):
                return True
    if auth.basic is not None and authorization and authorization.lower().startswith("basic "):
        try:
            user, _, password = base64.b64decode(authorization[6:].strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        want_user, want_password = auth.basic
        return hmac.compare_digest(user.encode(), want_user.encode()) and hmac.compare_digest(
            password.encode(), want_password.encode())
    return False


class GuardMiddleware:
    """Auth for HTTP and websocket requests; body size limit for HTTP requests."""

    def __init__(self, app, auth: Auth, limits: Limits) -> None:
        self.app, self.auth, self.limits = app, auth, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008,
                            "reason": "authentication required"})
                return
            return await _send_json(send, 401, error_body(
                "unauthorized", "authentication required: send HTTP Basic credentials "
                "(--api-auth) or the API key as 'Authorization: Bearer KEY' / 'X-API-Key'"),
                headers=[(b"www-authenticate", b'Basic realm="noisecraft"')])
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        if any(part in (".", "..") for part in scope["path"].split("/")):
            # decoded paths such as /object_info/..%2f would otherwise reach the static mount
            return await _send_json(send, 400, error_body(
                "invalid_path", f"path segments '.' and '..' are not allowed: {scope['path']!r}"))
        declared = _header(scope, b"content-length")
        limit = self.limits.max_body_bytes
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _send_json(send, 413, error_body(
                "payload_too_large", f"request body of {declared} bytes exceeds the limit of "
                f"{limit} bytes"))
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counted_receive, send)
        except _BodyTooLarge as e:
            await _send_json(send, 413, error_body("payload_too_large", str(e)))

    def _authorized(self, scope) -> bool:
        query = scope.get("query_string", b"").decode("latin-1")
        token = None
        for part in query.split("&"):
            key, _, value = part.partition("=")
            if key == "token":
                token = value
        return check_credentials(self.auth, _header(scope, b"authorization"),
                                 _header(scope, b"x-api-key"), token)


class _BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")


async def _send_json(send, status: int, body: dict, headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        got = err.get("input")
        simple = isinstance(got, int | float | str | bool | None)
        shown = repr(got) if simple else type(got).__name__
        parts.append(f"{where}: {err.get('msg', 'invalid')} (got {shown[:80]})")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(error_body(exc.kind, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse(error_body("http_error", str(exc.detail)),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body("invalid_request", _describe_validation(exc)),
                            status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse(error_body(
            "internal_error", f"internal error ({type(exc).__name__}); see the server log"),
            status_code=500)


async def read_json(request: Request, what: str = "request body") -> dict[str, Any]:
    """The JSON object in the body, or a 400 that says what was wrong with it."""
    raw = await request.body()
    if not raw.strip():
        raise RequestError(f"{what} is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(f"{what} nests arrays/objects too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def decode_base64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise RequestError(f"{what} must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):  # data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None


def decode_image(data: bytes | str, limits: Limits, what: str = "image") -> Image.Image:
    """A fully loaded PIL image from bytes (or base64 text), within the pixel limit."""
    raw = decode_base64(data, what) if isinstance(data, str) else data
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise RequestError(
                    f"{what} is {w}x{h} = {w * h} pixels; the limit is "
                    f"{limits.max_image_pixels} pixels", status=413, kind="image_too_large")
            im.load()
            return im.copy()
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            SyntaxError) as e:
        raise RequestError(f"{what} is not a readable image ({type(e).__name__}: {e})") from None
