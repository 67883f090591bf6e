"""The documented maxima, and the ASGI middleware that enforces size and content type.

BentoML reads a request body whole, of any size, and picks its parser from the Content-Type
header: an unknown type falls back to JSON, and `application/vnd.bentoml+pickle` means unpickle
(BentoML refuses that on the main server, but with a 415 whose body is a JSON list). The guard
below answers before BentoML sees the request: 413 for a body over MAX_BODY_BYTES (checked on
Content-Length up front, then by counting the bytes that actually arrive, so a chunked or lying
client gets the same answer), 415 for any Content-Type but the endpoint's own.
"""

import json

MAX_ROWS = 4096  # rows per /predict_batch request
# 1 MiB: 4096 rows of full-precision floats are about 180 KB of JSON, a 28x28 image as JSON about
# 20 KB, a 28x28 PNG under 4 KB. Anything larger is a mistake or an attack, not a request.
MAX_BODY_BYTES = 1 << 20

JSON = "application/json"
PNG = "image/png"


class RequestGuard:
    """Pure ASGI middleware for the POST routes in `routes` (path -> the one Content-Type they take).

    A request without a Content-Type is taken as the route's type, as BentoML does for JSON. The
    body is read here, at most `max_bytes` of it, and replayed to the app: the app never starts on
    a body that is too big, so it cannot turn the refusal into a 500.
    """

    def __init__(self, app, routes: dict[str, str], max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.routes = routes
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        expected = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if expected is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        content_type = headers.get("content-type", expected).split(";")[0].strip().lower()
        if content_type != expected:
            return await send_error(send, 415, f"Content-Type must be {expected} for {scope['path']}, "
                                               f"got {content_type or 'an empty one'}")
        length = headers.get("content-length", "")  # uvicorn has already refused a malformed one
        if length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, 413, self._too_big(int(length)))
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await send_error(send, 413, self._too_big(len(body), at_least=True))
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    def _too_big(self, size: int, at_least: bool = False) -> str:
        return (f"request body is {'over ' if at_least else ''}{size} bytes; "
                f"the limit is {self.max_bytes} bytes ({self.max_bytes // 1024} KiB)")


async def send_error(send, status: int, message: str) -> None:
    """Answer `{"error": message}` with `status`, in raw ASGI messages."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
