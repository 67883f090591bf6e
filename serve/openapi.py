"""The OpenAPI document at /docs.json (and the Swagger UI at /, which reads it): what this service answers.

    curl -s 127.0.0.1:3000/docs.json    # OpenAPI 3.0; clients and gateway rules are generated from it

BentoML generates a document from the typed endpoints (`Service.openapi_spec`, in
_bentoml_sdk/service/openapi.py of BentoML 1.4.39) that is wrong for this service: its error bodies
say `detail` is a string (BentoML's pydantic 400 sends a list), it lists 404 and an unexplained 500
(404 is never answered on purpose) and none of 405/413/415/422/429/503/504, it writes tuples as `prefixItems` (a JSON Schema
2020-12 keyword that OpenAPI 3.0 ignores, so rows of any length looked valid), it leaves the mounted
/v2 app out (it documents mounted FastAPI apps only), and its title, version and description are
placeholders. `document` takes BentoML's document and corrects all of that; `make_app` serves the result
at /docs.json, mounted by `serve.service` ahead of BentoML's own /docs.json route.

That app also serves the Swagger UI at / in place of BentoML's page (_bentoml_impl/server/main-openapi.html),
which loads Google Tag Manager from www.googletagmanager.com: every visit would be reported to a third
party, and behind a firewall the page waits on a host it cannot reach. This page is the same Swagger UI,
from the files BentoML ships (bentoml/_internal/server/static_content, served at /static_content), and
asks nothing of any other host: no tag manager, no validator badge (Swagger UI fetches one from
validator.swagger.io when the page's host is not localhost), and a Content-Security-Policy that keeps it so.

Every status below is an answer the service gives on purpose (tests/test_openapi.py checks the list
against the routes and the middleware, and a schema fuzzer checks it against a real server):
- the typed endpoints: 200; 400 a body that does not validate (BentoML's pydantic answer, with a
  "detail" list) or a PNG that cannot be decoded; 405/413/415 (`serve.limits.RequestGuard`); 422 a
  model output that is not finite, or a PNG of the wrong size or bit depth; 503 the endpoint's model
  is missing or broken; 500 onnxruntime failed on input that passed validation (a defect, logged);
  429 more than MAX_CONCURRENCY requests in flight; 504 no answer within TIMEOUT_S;
- /v2 (`serve.v2`): 400, 404 an unknown model or version, 405, 413/415 on .../infer, 422, 500 on
  .../infer as above, 503, 429, 504;
- /livez, /readyz, /healthz, /metrics: BentoML's own, plain text, exempt from the 429; /readyz 503.
A 405 is listed under the route's one operation: it is the answer to any other method on that path.
"""

import copy
import json
from pathlib import Path
from typing import Callable

import bentoml._internal.server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from serve.contract import DTYPES, FLOAT32_MAX
from serve.limits import MAX_BODY_BYTES, MAX_CONCURRENCY, MAX_ROWS, TIMEOUT_S
from serve.v2 import PACKAGE_VERSION, PLATFORM, SERVER_NAME

DESCRIPTION = f"""Take a PyTorch model from training to a verified HTTP service. Each model here was exported
to ONNX, checked against the eager model (parity) and registered with its I/O contract; it runs on onnxruntime.

**[/ui](/ui)**: the page for people: every served model's card (how it was trained, its metrics and parity)
and a form or drawing pad to try it.

**Typed endpoints** (POST, JSON unless noted): `/predict` and `/predict_batch` (the `product` model,
X1*X2), `/classify` (28x28 pixels as JSON) and `/classify_png` (a 28x28 PNG body), answered by the
newest `fashion-mnist` or `mnist` model. **Open Inference Protocol** (KServe v2): every model in the
store under its own name at `/v2/models/{{name}}`; `GET /v2/models/{{name}}` says what it takes.

**Errors** are JSON objects with an `error` message that says what to fix (BentoML's 400 for a body
that does not validate adds `detail`, one entry per problem). Limits: bodies up to {MAX_BODY_BYTES} bytes
(413), each endpoint's own Content-Type (415), {MAX_ROWS} rows per request, {MAX_CONCURRENCY} requests in
flight (429, on every route but /livez, /readyz, /healthz and /metrics), {TIMEOUT_S} s to start an answer (504).
A model that is missing or failed to load answers 503 on its endpoints, with how to train and export one;
one that fails on input that passed validation answers 500 (a defect of the model, in the server log)."""

REF = "#/components/schemas/"
TYPED = ("/predict", "/predict_batch", "/classify", "/classify_png")
FINITE = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}  # what float32 holds; JSON has no NaN
TEXT = {"text/plain": {"schema": {"type": "string"}}}

# --- error bodies ------------------------------------------------------------------------------------

SCHEMAS = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {"type": "string", "description": "what went wrong and what to send instead"}},
        "description": "Every error this service answers (but BentoML's 400 for a body that fails validation, "
                       "which adds `detail`)."},
    "ValidationError": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {
            "error": {"type": "string", "example": "1 validation error for PredictInput"},
            "detail": {"type": "array", "description": "one entry per problem (pydantic's errors); absent when "
                                                       "the body validated but repeats a key",
                       "items": {"$ref": REF + "ValidationProblem"}}},
        "description": "A body that is not valid JSON or does not validate against the request schema."},
    "ValidationProblem": {
        "type": "object", "required": ["type", "loc", "msg"],
        "properties": {
            "type": {"type": "string", "example": "extra_forbidden"},
            "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    "description": "where in the body: keys and list indices"},
            "msg": {"type": "string", "example": "Extra inputs are not permitted"},
            "url": {"type": "string"}}},
}


def _error(description: str, example: str, schema: str = "Error") -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": REF + schema}, "example": {"error": example}}}}


ERRORS = {
    405: _error("Method Not Allowed: the route takes another method (the Allow header names it)",
                "/predict takes POST, not GET"),
    413: _error("Payload Too Large: the body is over the limit", f"request body is 2000000 bytes; the limit is "
                f"{MAX_BODY_BYTES} bytes ({MAX_BODY_BYTES // 1024} KiB)"),
    415: _error("Unsupported Media Type: the Content-Type is not the route's own",
                "Content-Type must be application/json for /predict, got text/plain"),
    429: _error(f"Too Many Requests: more than {MAX_CONCURRENCY} requests in flight; retry later", "Too many requests"),
    504: _error(f"Gateway Timeout: no answer began within {TIMEOUT_S} s",
                f"Not able to process the request in {TIMEOUT_S} seconds"),
}
NOT_FINITE = _error("Unprocessable: the model's output is not finite (inputs far outside the training range)",
                    "the model's output is not finite for row(s) [0]: inputs this far outside the training range "
                    "overflow float32")
MODEL_FAILED = _error("Internal Server Error: onnxruntime failed on input that passed validation: a defect of the "
                      "model, not of the request (the server log has the details)",
                      "model product:4pfy2oxo5szhgax4 failed on this input (x [1, 2]): [ONNXRuntimeError] ...")
NO_MODEL = _error("Service Unavailable: the endpoint's model is missing or failed to load; the message says how to "
                  "train and export one", "no model named 'product' in the model store; train and export one: ...")
VALIDATION = {"description": "Bad Request: the body is not JSON or does not validate (`detail` lists each problem; "
                             "a repeated key has no `detail`)",
              "content": {"application/json": {"schema": {"$ref": REF + "ValidationError"}, "example": {
                  "error": "1 validation error for PredictInput",
                  "detail": [{"type": "missing", "loc": ["x2"], "msg": "Field required",
                              "url": "https://errors.pydantic.dev/2.13/v/missing"}]}}}}


def _guarded(path: str, content_type: str) -> dict:
    """405, 413, 415 as `serve.limits.RequestGuard` answers them on `path`."""
    errors = {s: copy.deepcopy(ERRORS[s]) for s in (405, 413, 415)}
    errors[405]["headers"] = {"Allow": {"schema": {"type": "string"}, "description": "POST"}}
    for status, example in ((405, f"{path} takes POST, not GET"),
                            (415, f"Content-Type must be {content_type} for {path}, got text/plain")):
        errors[status]["content"]["application/json"]["example"] = {"error": example}
    return {str(s): e for s, e in errors.items()}


# --- the typed endpoints -----------------------------------------------------------------------------

def _typed(paths: dict, schemas: dict) -> None:
    """Correct BentoML's operations for the typed endpoints in place: every answer, finite float32 numbers."""
    for path in TYPED:
        op = paths[path]["post"]
        png = path == "/classify_png"
        op["responses"] = {
            "200": op["responses"][200],  # BentoML's keys are ints until the document is serialized
            "400": _error("Bad Request: the body is not a PNG file or cannot be decoded",
                          "the body is not a PNG file (it does not start with the PNG signature)")
            if png else VALIDATION,
            **_guarded(path, "image/png" if png else "application/json"),
            "422": _error("Unprocessable: the PNG is not 28x28 pixels, or not 8-bit; or the model's output is not "
                          "finite", "the PNG is 1x1 pixels; send 28x28") if png else NOT_FINITE,
            "429": ERRORS[429], "500": MODEL_FAILED, "503": NO_MODEL, "504": ERRORS[504]}
    body = paths["/classify_png"]["post"]["requestBody"]
    body["required"] = True
    body["content"]["image/png"]["schema"] = {"type": "string", "format": "binary", "maxLength": MAX_BODY_BYTES}
    body["description"] = ("A PNG file of 28x28 pixels, 8-bit grayscale, RGB(A) or palette (colour is converted to "
                           "luminance, alpha dropped), at most 1 MiB. JSON Schema cannot state the pixel size: "
                           "another size is answered 422.")
    for path in TYPED:
        paths[path]["post"]["requestBody"]["required"] = True
    _walk([paths, schemas])


def _walk(node) -> None:
    """OpenAPI 3.0 schemas from pydantic's JSON Schema 2020-12, in place: a tuple's `prefixItems` become
    `items` (every tuple here is of one type), a plain number is a finite float32, BentoML's `root_input`
    marker goes (not an OpenAPI keyword)."""
    if isinstance(node, list):
        for item in node:
            _walk(item)
        return
    if not isinstance(node, dict):
        return
    node.pop("root_input", None)
    if "prefixItems" in node:
        prefix = node.pop("prefixItems")
        assert all(p == prefix[0] for p in prefix), f"a tuple of mixed types cannot be stated in OpenAPI 3.0: {prefix}"
        node["items"] = prefix[0]
    if node.get("type") == "number" and "minimum" not in node and "maximum" not in node:
        node.update(FINITE)  # serve.validate.Number: finite and within float32 (pixels carry their own 0..255)
    for value in node.values():
        _walk(value)


# --- the Open Inference Protocol (serve.v2) ------------------------------------------------------------

V2_SCHEMAS = {
    "V2ModelParameters": {
        "type": "object", "required": ["variant"], "additionalProperties": False,
        "properties": {"variant": {"type": "string", "enum": ["fp32", "int8", "fp16"],
                                   "description": "fp32, or the quantized variant `python -m export --quantize` made"}}},
    "V2Parameters": {
        "type": "object", "description": "strings, numbers or booleans. A JSON body carries no binary data, so the "
                                         "binary tensor extension's parameters are false here; that extension "
                                         "(tritonclient's default) sends a JSON header of Inference-Header-Content-"
                                         "Length bytes followed by the raw tensors, each input saying its "
                                         "binary_data_size, and gets binary outputs when it asks (binary_data, "
                                         "binary_data_output). An input's content_type \"base64\": its BYTES "
                                         "data are files (PNG, JPEG) as base64 text",
        "properties": {k: {"type": "boolean", "enum": [False]} for k in ("binary_data", "binary_data_output",
                                                                          "binary_data_size")},
        "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}},
    # Each level holds numbers or lists, never both (the server refuses a mix).
    "V2Data": {"description": "row-major values, flat or nested as the shape: numbers (FP32, INT64: integers), "
                              "booleans (BOOL) or strings (BYTES: text, or base64 files for an image input, "
                              "for an input that takes them)",
               "anyOf": [{"type": "array", "items": FINITE}, {"type": "array", "items": {"type": "boolean"}},
                         {"type": "array", "items": {"type": "string"}},
                         {"type": "array", "items": {"$ref": REF + "V2Data"}}]},
    "V2RequestInput": {
        "type": "object", "required": ["name", "shape", "datatype", "data"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "example": "x"},
                       "shape": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1},
                                 "example": [1, 2]},
                       "datatype": {"type": "string", "enum": sorted({d[0] for d in DTYPES.values()} | {"BYTES"})},
                       "data": {"$ref": REF + "V2Data"},
                       "parameters": {"$ref": REF + "V2Parameters"}}},
    "V2RequestOutput": {"type": "object", "required": ["name"], "additionalProperties": False,
                        "properties": {"name": {"type": "string"}, "parameters": {"$ref": REF + "V2Parameters"}}},
    "V2InferenceRequest": {
        "type": "object", "required": ["inputs"], "additionalProperties": False,
        "description": "What a model takes is in its metadata (GET /v2/models/{name}): every input exactly once, "
                       "with its name and datatype, shape [n, ...the model's sample shape] with 1 <= n <= "
                       f"{MAX_ROWS}, n the same for every input, `data` holding exactly the product of the shape "
                       "values (flat, or nested as the shape), each within the input's range if it has one. JSON "
                       "Schema cannot state these (they depend on the model): a request that breaks one is answered "
                       "400 with what to send.",
        "properties": {"id": {"type": "string"}, "parameters": {"$ref": REF + "V2Parameters"},
                       "inputs": {"type": "array", "minItems": 1, "items": {"$ref": REF + "V2RequestInput"}},
                       "outputs": {"type": "array", "minItems": 1, "items": {"$ref": REF + "V2RequestOutput"},
                                   "description": "the outputs to answer with, each once; all when absent"}},
        "example": {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [3, 4]}]}},
    "V2Tensor": {"type": "object", "required": ["name", "datatype", "shape", "data"], "additionalProperties": False,
                 "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                "shape": {"type": "array", "items": {"type": "integer"}},
                                "data": {"type": "array", "items": {"type": "number"}, "description": "flat"},
                                "parameters": {"type": "object", "description": "binary_data_size, for an output "
                                                                                "sent as binary data (then no data)"}}},
    "V2InferenceResponse": {
        "type": "object", "required": ["model_name", "model_version", "parameters", "outputs"],
        "additionalProperties": False,
        "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                       "parameters": {"$ref": REF + "V2ModelParameters"},
                       "id": {"type": "string", "description": "the request's id, when it had one"},
                       "outputs": {"type": "array", "items": {"$ref": REF + "V2Tensor"}}}},
    "V2TensorMetadata": {"type": "object", "required": ["name", "datatype", "shape"], "additionalProperties": False,
                         "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                        "shape": {"type": "array", "items": {"type": "integer"},
                                                  "description": "-1 for the batch axis"},
                                        "parameters": {
                                            "type": "object", "description": "an image input's: it also takes PNG "
                                            "and JPEG files, BYTES of shape [n] (encoded_image), converted to "
                                            "image_mode, resized (image_resize) to image_size and scaled to "
                                            "image_range",
                                            "additionalProperties": {"type": "string"}}}},
    "V2ModelMetadata": {
        "type": "object", "required": ["name", "versions", "platform", "inputs", "outputs", "parameters"],
        "additionalProperties": False,
        "properties": {"name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                       "parameters": {"$ref": REF + "V2ModelParameters"},
                       "platform": {"type": "string", "enum": [PLATFORM]},
                       "inputs": {"type": "array", "items": {"$ref": REF + "V2TensorMetadata"}},
                       "outputs": {"type": "array", "items": {"$ref": REF + "V2TensorMetadata"}}}},
    "V2ServerMetadata": {
        "type": "object", "required": ["name", "version", "extensions"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "enum": [SERVER_NAME]}, "version": {"type": "string"},
                       "extensions": {"type": "array", "items": {"type": "string"}}}},
    "V2Live": {"type": "object", "required": ["live"], "additionalProperties": False,
               "properties": {"live": {"type": "boolean", "enum": [True]}}},
    "V2Ready": {"type": "object", "required": ["ready"], "additionalProperties": False,
                "properties": {"ready": {"type": "boolean", "enum": [True]}}},
    "V2NotReady": {"type": "object", "required": ["ready", "error"], "additionalProperties": False,
                   "properties": {"ready": {"type": "boolean", "enum": [False]}, "error": {"type": "string"}}},
    "V2ModelReady": {"type": "object", "required": ["name", "ready"], "additionalProperties": False,
                     "properties": {"name": {"type": "string"}, "ready": {"type": "boolean", "enum": [True]}}},
}


def _ok(schema: str, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF + schema}}}}


# BentoML's rule for a model's name and version (bentoml/_internal/tag.py): anything else names no model (404).
TAG_PART = {"type": "string", "pattern": "^[a-z0-9]([-._a-z0-9]*[a-z0-9])?$", "maxLength": 63}
NAME = {"name": "name", "in": "path", "required": True, "schema": TAG_PART,
        "example": "product", "description": "a model's name in the store (GET /v2 does not list them; /readyz "
                                              "and the server log do)"}
VERSION = {"name": "version", "in": "path", "required": True, "schema": TAG_PART,
           "description": "the served version of the model (its metadata's `versions`); another is 404"}
UNKNOWN = _error("Not Found: no model of that name is served, or not at that version", "no model named 'nope' is "
                 "served here; served: fashion-mnist, product")
V2_GET_405 = copy.deepcopy(ERRORS[405])
V2_GET_405["content"]["application/json"]["example"] = {"error": "POST /v2: Method Not Allowed"}
V2_GET_405["headers"] = {"Allow": {"schema": {"type": "string"}, "description": "GET, HEAD"}}
V2_COMMON = {"429": ERRORS[429], "504": ERRORS[504]}


def _v2_get(summary: str, ok: dict, extra: dict | None = None, params: list | None = None) -> dict:
    op = {"tags": ["Open Inference Protocol"], "summary": summary,
          "responses": {"200": ok, **(extra or {}), "405": V2_GET_405, **V2_COMMON}}
    if params:
        op["parameters"] = params
    return {"get": op}


def _v2_paths() -> dict:
    paths = {
        "/v2": _v2_get("Server metadata", _ok("V2ServerMetadata")),
        "/v2/health/live": _v2_get("Server liveness", _ok("V2Live")),
        "/v2/health/ready": _v2_get("Server readiness: as /readyz", _ok("V2Ready"), {"503": {
            "description": "a model this server should serve failed to load",
            "content": {"application/json": {"schema": {"$ref": REF + "V2NotReady"}}}}}),
    }
    for prefix, params in (("/v2/models/{name}", [NAME]), ("/v2/models/{name}/versions/{version}", [NAME, VERSION])):
        found = {"404": UNKNOWN, "503": NO_MODEL}
        paths[prefix] = _v2_get("Model metadata: its inputs and outputs", _ok("V2ModelMetadata"), found, params)
        paths[prefix + "/ready"] = _v2_get("Model readiness", _ok("V2ModelReady"), found, params)
        infer = {"tags": ["Open Inference Protocol"], "summary": "Inference", "parameters": params,
                 "requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"$ref": REF + "V2InferenceRequest"}}}},
                 "responses": {"200": _ok("V2InferenceResponse"),
                               "400": _error("Bad Request: the body is not JSON, does not validate, or does not match "
                                             "the model's inputs", "inputs[0].data has 3 values; shape [1, 2] needs 2"),
                               "404": UNKNOWN, **_guarded(prefix + "/infer", "application/json"),
                               "422": NOT_FINITE, "500": MODEL_FAILED, "503": NO_MODEL, **V2_COMMON}}
        paths[prefix + "/infer"] = {"post": infer}
    for path, item in paths.items():  # operationIds: generated clients name their methods after them
        for method, op in item.items():
            op["operationId"] = "v2_" + (path[4:].replace("/", "_").replace("{", "").replace("}", "") or "server") \
                + ("" if method == "get" or path.endswith("infer") else "_" + method)
    return paths


# --- BentoML's own routes -------------------------------------------------------------------------------

def _infra(paths: dict) -> None:
    for path, item in paths.items():
        if path not in ("/livez", "/readyz", "/healthz", "/metrics"):
            continue
        op = item["get"]
        content = ({"text/plain": {"schema": {"type": "string"}, "example": "# HELP ..."}} if path == "/metrics"
                   else TEXT)
        op["responses"] = {"200": {"description": "OK", "content": content},
                           "405": {"description": "Method Not Allowed: the route takes GET (Starlette's answer, plain "
                                                  "text)", "content": TEXT,
                                   "headers": {"Allow": {"schema": {"type": "string"}, "description": "HEAD, GET"}}},
                           "504": ERRORS[504]}
        if path == "/readyz":
            op["responses"]["503"] = {"description": "Not ready: a model this server should serve failed to load "
                                                     "(the server log says why)", "content": TEXT}
        op["operationId"] = path.strip("/")


# --- the document --------------------------------------------------------------------------------------

def document(bentoml_spec: dict) -> dict:
    """This service's OpenAPI document, from the one BentoML generates (`Service.openapi_spec.asdict()`)."""
    spec = copy.deepcopy(bentoml_spec)
    spec["info"] = {"title": SERVER_NAME, "version": PACKAGE_VERSION, "description": DESCRIPTION}
    schemas = spec["components"]["schemas"]
    for unused in ("InvalidArgument", "NotFound", "InternalServerError", "TaskStatusResponse"):
        schemas.pop(unused, None)
    paths = spec["paths"]
    _typed(paths, schemas)
    _infra(paths)
    schemas.update(copy.deepcopy(SCHEMAS))
    schemas.update(copy.deepcopy(V2_SCHEMAS))
    paths.update(_v2_paths())
    spec["tags"] = [*spec.get("tags", []), {"name": "Open Inference Protocol",
                                            "description": "KServe v2 / Triton HTTP, every model in the store"}]
    return spec


def make_app(bentoml_spec: Callable[[], dict]) -> Starlette:
    """The app that serves the document at /docs.json, made from `bentoml_spec()` (BentoML's document, as
    `Service.openapi_spec.asdict()` gives it) once per worker, at the first request: the service does not change.

    The service passes that function in (`serve.service`), so this module does not import the service."""
    document_bytes: bytes | None = None

    async def docs_json(request: Request) -> Response:
        nonlocal document_bytes
        if document_bytes is None:
            document_bytes = json.dumps(document(bentoml_spec())).encode()
        return Response(document_bytes, media_type="application/json")

    # Mounted at "/" by serve.service: BentoML tries its mounted apps before its own routes (/, /docs.json and
    # /static_content, which it mounts only without its "new_index" feature: this app mounts the files itself).
    return Starlette(routes=[
        Route("/docs.json", docs_json, methods=["GET"]),
        Route("/", swagger_page, methods=["GET"]),
        Route("/docs.js", swagger_script, methods=["GET"]),
        Mount("/static_content", StaticFiles(directory=SWAGGER_FILES)),
    ])


# --- the Swagger UI at / ----------------------------------------------------------------------------------

SWAGGER_FILES = Path(bentoml._internal.server.__file__).parent / "static_content"  # Swagger UI, as BentoML ships it
# Relative URLs, as BentoML's page has: behind a proxy that serves this server under a prefix, they still resolve.
SWAGGER_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>{SERVER_NAME}</title>
  <link rel="stylesheet" href="./static_content/swagger-ui.css">
  <link rel="stylesheet" href="./static_content/index.css">
  <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" sizes="32x32"
        media="(prefers-color-scheme: light)">
  <link rel="icon" type="image/png" href="./static_content/favicon-dark-32x32.png" sizes="32x32"
        media="(prefers-color-scheme: dark)">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="./static_content/swagger-ui-bundle.js"></script>
  <script src="./static_content/swagger-ui-standalone-preset.js"></script>
  <script src="./docs.js"></script>
</body>
</html>
""".encode()
SWAGGER_SCRIPT = b"""window.onload = () => {
  window.ui = SwaggerUIBundle({
    url: "./docs.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout",
    validatorUrl: null,  // no badge: it is an image from validator.swagger.io
  });
};
"""
# Only this server, for anything the page loads or sends; Swagger UI sets styles inline and draws icons as data: URLs.
SWAGGER_CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"


async def swagger_page(request: Request) -> Response:
    return Response(SWAGGER_PAGE, media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": SWAGGER_CSP, "Cache-Control": "no-cache"})


async def swagger_script(request: Request) -> Response:
    return Response(SWAGGER_SCRIPT, media_type="text/javascript; charset=utf-8", headers={"Cache-Control": "no-cache"})
