"""The documented maxima, and the ASGI middleware that enforces size and content type.

BentoML reads a request body whole, of any size, and picks its parser from the Content-Type
header: an unknown type falls back to JSON, and `application/vnd.bentoml+pickle` means unpickle
(BentoML refuses that on the main server, but with a 415 whose body is a JSON list). The guard
below answers before BentoML sees the request: 413 for a body over MAX_BODY_BYTES (checked on
Content-Length up front, then by counting the bytes that actually arrive, so a chunked or lying
client gets the same answer), 415 for any Content-Type but the endpoint's own, 405 for a method
but POST (and OPTIONS), and a JSON 404 for a path with a newline. It also counts the quote
characters of a JSON body for `serve.validate.check_unique_keys`.

Concurrency and time are limited by BentoML itself (`traffic` in `serve.service`): a request beyond
MAX_CONCURRENCY in flight gets 429 at once, and one that has not started its answer TIMEOUT_S
seconds after its headers arrived (a slow body included: this guard runs inside that timer) gets 504.
The timer is BentoML's, mended here (`TimeoutMiddleware`) so that it does not hold memory after the
request.
"""

import asyncio
import contextvars
import json
import os
import re
from contextvars import ContextVar

from bentoml._internal.server.http import traffic

MAX_ROWS = 4096  # rows per /predict_batch request
# 1 MiB: 4096 rows of full-precision floats are about 180 KB of JSON, a 28x28 image as JSON about
# 20 KB, a 28x28 PNG under 4 KB. Anything larger is a mistake or an attack, not a request.
MAX_BODY_BYTES = 1 << 20
# Requests in flight (reading the body, waiting for the model, answering) before BentoML answers 429.
# Well above the 32 concurrent clients the service is sized for; bodies are read before a request
# waits for the model, so the worst case holds about MAX_CONCURRENCY * MAX_BODY_BYTES (128 MiB) of bodies.
MAX_CONCURRENCY = 128
# Seconds from a request's headers to the start of its answer before BentoML answers 504 (its default
# is 60). A request takes milliseconds; this bounds a stuck one and a client that sends its body slowly.
TIMEOUT_S = 30

# Binary requests (Triton's binary tensor extension, /v2 only) carry raw tensors: a batch of 16 3x224x224 images
# is 9.6 MB. Each model's limit is its largest valid request (MAX_ROWS rows), but never above this ceiling, which
# T2D_MAX_BINARY_BYTES sets: with MAX_CONCURRENCY requests reading bodies at once, the worst case is their product.
BINARY_CEILING = int(os.environ.get("T2D_MAX_BINARY_BYTES", 64 << 20))
# Encoded images (PNG, JPEG) sent as binary data to an image input: files up to this much in all per request,
# whatever the model's own size (a phone's photo for a 28x28 model), within BINARY_CEILING. A JSON body (base64)
# stays within MAX_BODY_BYTES.
IMAGE_FILES_BYTES = 32 << 20
BINARY_HEADER = "inference-header-content-length"
OCTET_STREAM = "application/octet-stream"

# The number of '"' bytes in the JSON body of the request being handled; set by RequestGuard.
body_quotes: ContextVar[int | None] = ContextVar("body_quotes", default=None)

JSON = "application/json"
PNG = "image/png"


class RequestGuard:
    """Pure ASGI middleware for the POST routes in `routes` (path -> the one Content-Type they take) and
    in `patterns` (a regular expression the whole path must match -> Content-Type), for routes with
    path parameters such as /v2/models/{name}/infer.

    A request without a Content-Type is taken as the route's type, as BentoML does for JSON. The
    body is read here, at most `max_bytes` of it, and replayed to the app: the app never starts on
    a body that is too big, so it cannot turn the refusal into a 500.
    """

    def __init__(self, app, routes: dict[str, str], patterns: dict[str, str] | None = None,
                 max_bytes: int = MAX_BODY_BYTES, binary_limit=None):
        self.app = app
        self.routes = routes
        self.patterns = [(re.compile(p), content_type) for p, content_type in (patterns or {}).items()]
        self.max_bytes = max_bytes
        # path -> the most bytes a binary request (Triton's binary tensor extension) to it may have, or None for
        # routes that take none: the model's own largest request, within BINARY_CEILING.
        self.binary_limit = binary_limit

    def expected_type(self, path: str) -> str | None:
        expected = self.routes.get(path)
        if expected is None:
            for pattern, content_type in self.patterns:
                if pattern.fullmatch(path):
                    return content_type
        return expected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "\n" in scope.get("path", ""):
            # No route has a newline, but Starlette's Mount matches its path with `.*`, which stops at one:
            # /v2/models/a%0Ab would get the router's text/plain 404, the one non-JSON error. Answer it here.
            return await send_error(send, 404, "no route has a newline in its path")
        expected = self.expected_type(scope.get("path", "")) if scope["type"] == "http" else None
        if expected is None:
            return await self.app(scope, receive, send)
        if scope["method"] not in ("POST", "OPTIONS"):  # OPTIONS: a CORS preflight, should CORS be enabled
            return await send_error(send, 405, f"{scope['path']} takes POST, not {scope['method']}",
                                    [(b"allow", b"POST")])
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        content_type = headers.get("content-type", expected).split(";")[0].strip().lower()
        limit, what = self.max_bytes, ""
        binary = BINARY_HEADER in headers and self.binary_limit is not None
        if binary:  # a JSON header and raw tensors: the body may be as large as the model's largest request
            limit = self.binary_limit(scope["path"]) or self.max_bytes
            what = " for this model's binary requests"
            if content_type == OCTET_STREAM:
                content_type = expected
        if content_type != expected:
            return await send_error(send, 415, f"Content-Type must be {expected} for {scope['path']}, "
                                               f"got {content_type or 'an empty one'}")
        length = headers.get("content-length", "")  # uvicorn has already refused a malformed one
        if length.isdigit() and int(length) > limit:
            return await send_error(send, 413, self._too_big(int(length), limit, what=what))
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                return await send_error(send, 413, self._too_big(len(body), limit, at_least=True, what=what))
            if not message.get("more_body", False):
                break
        if expected == JSON and not binary:
            body_quotes.set(body.count(b'"'))

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    @staticmethod
    def _too_big(size: int, limit: int, at_least: bool = False, what: str = "") -> str:
        return (f"request body is {'over ' if at_least else ''}{size} bytes; "
                f"the limit{what} is {limit} bytes ({limit // 1024} KiB)")


async def send_error(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer `{"error": message}` with `status`, in raw ASGI messages."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class TimeoutMiddleware(traffic.TimeoutMiddleware):
    """BentoML's TimeoutMiddleware (bentoml/_internal/server/http/traffic.py, 1.4.39: 504 when no answer
    has started within `timeout` seconds), with its timer disarmed when the request ends.

    BentoML's leaves the timer armed for the full timeout after every request, and an armed asyncio
    timer keeps a copy of the request's context variables (its OpenTelemetry span and more). Measured
    here under 32 connections at about 300 requests/s with the 30 s timeout: the worker's RSS grew by
    61 MiB over the first 30 s, then stayed there; with a 5 s timeout it grew 18 MiB over 5 s. The
    retained memory is rate x timeout, so a faster machine or a longer timeout holds more. Here the
    timer runs in an empty context and is cancelled as soon as the request is done.
    """

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter, context=contextvars.Context())

        async def _send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            try:
                await waiter
            except asyncio.TimeoutError:
                if fut.cancel():
                    await send_error(send, 504, f"Not able to process the request in {self.timeout} seconds")
            else:
                await fut  # the answer has started: let it finish, however long it takes
        finally:
            timer.cancel()


def mend_bentoml_timeout() -> None:
    """Make BentoML build its apps with `TimeoutMiddleware` above. Call before the service's app is made
    (`serve.service` does, at import): BentoML looks the class up in `traffic` when it makes the app."""
    traffic.TimeoutMiddleware = TimeoutMiddleware
