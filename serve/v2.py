"""Every served model over the Open Inference Protocol (KServe v2, Triton's HTTP/REST), JSON or binary.

    curl -s -X POST 127.0.0.1:3000/v2/models/product/infer -H 'Content-Type: application/json' \\
        -d '{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [3, 4]}]}'
    -> {"model_name":"product","model_version":"...",
        "outputs":[{"name":"y","datatype":"FP32","shape":[1,1],"data":[12.01...]}]}

Triton's binary tensor data extension (what `tritonclient.http` uses by default) and every datatype a
contract takes (FP32, INT64, BOOL; BYTES text for a tokenized input, BYTES PNG or JPEG files for an image
input, which its metadata says in `parameters`): `serve.tensors` and `serve.images`.

Routes (a Starlette app that `serve.service` mounts into the same `bentoml serve`):
GET /v2 (server metadata), /v2/health/live, /v2/health/ready (the /readyz rule), /v2/models/{name}
and /v2/models/{name}/versions/{version} (metadata), .../ready, and POST .../infer. Everything a
model takes is read from its contract and graph (`serve.contract`): any name, any inputs and outputs.

The models are the service's own (`serve.store.Registry`, loaded once per worker in the service's
__init__, which puts it on `app.state.registry`): /v2 and the typed endpoints answer from the same
sessions. Errors are `{"error": "..."}` (KServe's error format): 400 a body that does not validate
against the contract, 404 an unknown model or a version that is not the served one, 405/413/415 from
`serve.limits.RequestGuard` (which also guards .../infer), 422 a model output that is not finite, 503 a
model that failed to load. Answers are written with the standard json module: a request is mostly
HTTP and routing, and json's C decoder parses a 256-row body in about 0.1 ms.
"""

import json
from importlib import metadata

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serve.contract import TensorSpec
from serve.images import image_parameters, takes_images
from serve.limits import BINARY_CEILING, IMAGE_FILES_BYTES, MAX_ROWS
from serve.store import PINS_ENV, ModelRunError, OnnxModel, Registry
from serve.tensors import HEADER_LENGTH, V2Error, encode_output, parse_inputs, show, split_body
from t2d.files import first_line

SERVER_NAME = "train-to-deploy"
PLATFORM = "onnxruntime_onnx"
# The POST routes, for RequestGuard (matched against the full path, mount prefix included).
V2_POST_ROUTE = r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer"
REQUEST_KEYS = frozenset({"id", "inputs", "outputs", "parameters"})
OUTPUT_KEYS = frozenset({"name", "parameters"})
# Elements per request above which the model runs in a worker thread: a big CNN batch takes tens of
# ms, which would stall every other connection; a small one is faster inline than a thread hop (~0.1 ms).
INLINE_ELEMENTS = 100_000


def _package_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:  # a Bento holds serve/ only, not the installed package
        return "unknown"


PACKAGE_VERSION = _package_version()
SERVER_METADATA = json.dumps({"name": SERVER_NAME, "version": PACKAGE_VERSION,
                              "extensions": ["binary_tensor_data"]}).encode()


def _json(status: int, content: bytes | dict) -> Response:
    body = content if isinstance(content, bytes) else json.dumps(content, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json")


# --- routes ----------------------------------------------------------------------------------------

async def server_metadata(request: Request) -> Response:
    return _json(200, SERVER_METADATA)


async def live(request: Request) -> Response:
    return _json(200, {"live": True})


async def ready(request: Request) -> Response:
    registry = _registry(request)
    if registry.ready:
        return _json(200, {"ready": True})
    broken = sorted(n for n, s in registry.models.items() if s.error is not None)
    return _json(503, {"ready": False, "error": f"not ready: a model this server should serve failed to load "
                                                f"({', '.join(broken) or 'see the server log'}); "
                                                f"the server log says why"})


async def model_metadata(request: Request) -> Response:
    model = _model(request)
    return _json(200, {"name": model.name, "versions": [model.version], "platform": PLATFORM,
                       "inputs": [_input_metadata(s) for s in model.inputs],
                       "outputs": [s.metadata() for s in model.outputs],
                       "parameters": {"variant": model.variant}})


def _input_metadata(spec: TensorSpec) -> dict:
    # The protocol's tensor metadata has no way to say that an FP32 input also takes BYTES files: parameters do.
    return {**spec.metadata(), "parameters": image_parameters(spec)} if takes_images(spec) else spec.metadata()


async def model_ready(request: Request) -> Response:
    model = _model(request)
    return _json(200, {"name": model.name, "ready": True})


async def infer(request: Request) -> Response:
    model = _model(request)
    header, binary = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
    body = parse_body(header)
    if "parameters" in body:
        check_parameters(body["parameters"], "parameters")
    entries = body.get("inputs")
    if type(entries) is list and any(type(e) is dict and e.get("datatype") == "BYTES" for e in entries):
        # Files to decode (a photo takes tens of ms): in a worker thread, so other connections are answered meanwhile.
        feeds, rows = await run_in_threadpool(parse_inputs, entries, model.inputs, binary, check_parameters)
    else:
        feeds, rows = parse_inputs(entries, model.inputs, binary, check_parameters)
    wanted = parse_outputs(body["outputs"], model.outputs) if "outputs" in body else [
        (spec, None) for spec in model.outputs]
    if "id" in body and type(body["id"]) is not str:
        raise V2Error(400, f"id must be a string, got {show(body['id'])}")
    names = [spec.name for spec, _ in wanted]
    try:
        if sum(x.size for x in feeds.values()) > INLINE_ELEMENTS:
            outs = await run_in_threadpool(model.run_named, feeds, names)
        else:
            outs = model.run_named(feeds, names)
    except ModelRunError as e:
        raise V2Error(e.status, str(e)) from e
    all_binary = (body.get("parameters") or {}).get("binary_data_output") is True
    answer = {"model_name": model.name, "model_version": model.version, "parameters": {"variant": model.variant}}
    if "id" in body:
        answer["id"] = body["id"]
    answer["outputs"], data = [], []
    for (spec, binary_out), out in zip(wanted, outs):
        _finite(spec, out)
        entry, raw = encode_output(spec, out, all_binary if binary_out is None else binary_out)
        answer["outputs"].append(entry)
        data.append(raw)
    if not any(data):
        return _json(200, answer)
    head = json.dumps(answer, separators=(",", ":")).encode()
    return Response(head + b"".join(data), status_code=200, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


def _finite(spec: TensorSpec, out: np.ndarray) -> None:
    if not np.isfinite(out).all():
        bad = np.flatnonzero(~np.isfinite(out.reshape(len(out), -1)).all(axis=1))[:10].tolist()
        raise V2Error(422, f"the model's output {spec.name!r} is not finite for row(s) {bad}: inputs this far "
                           f"outside the training range overflow float32")


# --- how large a binary request may be -----------------------------------------------------------

ELEMENT_BYTES = {"FP32": 4, "INT64": 8, "BOOL": 1}
HEADER_BYTES = 1 << 16  # the JSON header of a binary request: names, shapes and parameters only
TEXT_TOKEN_BYTES = {"char": 4, "word": 64}  # UTF-8 takes at most 4 bytes a character; words, a generous bound


def binary_limit(path: str) -> int | None:
    """The largest binary request the model that `path` names can take (MAX_ROWS rows of every input at its
    largest, text at its longest; for an image input at least IMAGE_FILES_BYTES of files), within
    BINARY_CEILING; None where no model is served under that name."""
    registry = app.state.registry
    parts = path.split("/")
    served = registry.models.get(parts[3]) if registry is not None and len(parts) > 3 else None
    if served is None or served.model is None:
        return None
    row, limit = 0, 0
    for spec in served.model.inputs:
        row += spec.size * ELEMENT_BYTES[spec.datatype]
        if spec.tokenizer is not None:
            row = max(row, 4 + spec.max_length * TEXT_TOKEN_BYTES[spec.tokenizer.level])
        if takes_images(spec):  # a photo's file is larger than a small model's rows
            limit = HEADER_BYTES + IMAGE_FILES_BYTES
    return min(BINARY_CEILING, max(limit, HEADER_BYTES + MAX_ROWS * row))


# --- which model -----------------------------------------------------------------------------------

def _registry(request: Request) -> Registry:
    registry = request.app.state.registry
    if registry is None:  # not reached under `bentoml serve`: nothing answers before the service's __init__
        raise V2Error(503, "the models are not loaded yet; try again in a few seconds")
    return registry


def _model(request: Request) -> OnnxModel:
    """The model the path names, at the served version; V2Error 404 or 503 otherwise."""
    registry = _registry(request)
    name = request.path_params["name"]
    version = request.path_params.get("version")
    served = registry.models.get(name)
    if served is None:
        raise V2Error(404, f"no model named {name!r} is served here; "
                           f"served: {', '.join(sorted(registry.models)) or 'none'}")
    if version is not None and (served.tag is None or version != served.tag.split(":")[1]):
        now = f"this server serves {served.tag}" if served.tag else f"this server serves no version of {name}"
        if version in served.versions:
            raise V2Error(404, f"version {version} of {name} is in the model store but not served ({now}); pin it with "
                               f"{PINS_ENV}={name}:{version} and restart the server")
        raise V2Error(404, f"model {name} has no version {version!r} ({now})")
    if served.model is None:
        raise V2Error(503, str(served.error))
    return served.model


# --- request validation ----------------------------------------------------------------------------

def _refuse_constant(literal: str):
    raise V2Error(400, f"the body holds {literal}, which is not a JSON number; send finite numbers")


def _unique_keys(pairs: list[tuple]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise V2Error(400, f"the body names {twice!r} more than once in one object; send each key once")
    return obj


# Made once: json.loads with hooks builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)


def parse_body(raw: bytes) -> dict:
    """The request body as a dict with known keys; V2Error 400 otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise V2Error(400, "the body is not UTF-8 text; send JSON") from None
    try:
        body = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise V2Error(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise V2Error(400, "the body's JSON is nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits (Python's int-from-string limit)
        raise V2Error(400, f"the body holds a number json cannot read: {first_line(e, 200)}") from None
    if type(body) is not dict:
        raise V2Error(400, 'the body must be a JSON object: {"inputs": [{"name", "shape", "datatype", "data"}]}')
    unknown = body.keys() - REQUEST_KEYS
    if unknown:
        raise V2Error(400, f"unknown key(s) {sorted(unknown)} in the body; it takes {', '.join(sorted(REQUEST_KEYS))}")
    return body


def parse_outputs(entries, specs: tuple[TensorSpec, ...]) -> list[tuple[TensorSpec, bool | None]]:
    """The outputs asked for, each with whether it is wanted as binary data (None: as the request's default)."""
    names = ", ".join(s.name for s in specs)
    if type(entries) is not list or not entries:
        raise V2Error(400, f"outputs, when given, must be a non-empty list of {{\"name\"}}; this model gives {names}")
    by_name = {s.name: s for s in specs}
    wanted: list[tuple[TensorSpec, bool | None]] = []
    for i, entry in enumerate(entries):
        where = f"outputs[{i}]"
        if type(entry) is not dict or "name" not in entry or entry.keys() - OUTPUT_KEYS:
            raise V2Error(400, f"{where} must be an object with a name (and optional parameters)")
        spec = by_name.get(entry["name"]) if type(entry["name"]) is str else None
        if spec is None:
            raise V2Error(400, f"{where}.name is {show(entry['name'])}; this model gives {names}")
        if any(spec is w for w, _ in wanted):
            raise V2Error(400, f"output {spec.name!r} is requested twice")
        binary = None
        if "parameters" in entry:
            check_parameters(entry["parameters"], f"{where}.parameters")
            binary = entry["parameters"].get("binary_data")
            if binary is not None and type(binary) is not bool:
                raise V2Error(400, f"{where}.parameters.binary_data must be true or false, got {show(binary)}")
        wanted.append((spec, binary))
    return wanted


def check_parameters(parameters, where: str) -> None:
    """Parameters are an object of strings, numbers and booleans (the protocol's rule). The binary extension's
    (binary_data_size, binary_data, binary_data_output) are read where they apply; others carry nothing this
    server uses."""
    if type(parameters) is not dict:
        raise V2Error(400, f"{where} must be an object")
    for key, value in parameters.items():
        if type(value) not in (str, int, float, bool):
            raise V2Error(400, f"{where}.{key} is {show(value)}; parameters are strings, numbers or booleans")
    if "binary_data_output" in parameters and type(parameters["binary_data_output"]) is not bool:
        raise V2Error(400, f"{where}.binary_data_output must be true or false")


# --- the app ---------------------------------------------------------------------------------------

async def _error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, V2Error):
        return _json(exc.status, {"error": str(exc)})
    assert isinstance(exc, HTTPException)
    response = _json(exc.status_code, {"error": f"{request.method} {request.url.path}: {exc.detail}"})
    response.headers.update(exc.headers or {})  # a 405's Allow: the methods the route takes
    return response


async def not_found(request: Request) -> Response:
    raise V2Error(404, f"no route {request.url.path}; see GET /v2/models/<name> and POST /v2/models/<name>/infer")


def make_app() -> Starlette:
    """The /v2 app, to mount at "/" (its routes carry the /v2 prefix, so that `GET /v2` itself is a route: a
    mount at "/v2" matches only paths under "/v2/" and BentoML's router answers `/v2` with a redirect).
    BentoML's mount passes a request on to the rest of the service unless one of these routes matches.
    `app.state.registry` is set by the service once the models are loaded."""
    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    # The infer routes first: Starlette tries routes in order, and they take most of the traffic.
    routes = [Route(model + "/infer", infer, methods=["POST"]), Route(version + "/infer", infer, methods=["POST"]),
              Route("/v2", server_metadata, methods=["GET"]),
              Route("/v2/", server_metadata, methods=["GET"]),
              Route("/v2/health/live", live, methods=["GET"]),
              Route("/v2/health/ready", ready, methods=["GET"])]
    for prefix in (model, version):
        routes += [Route(prefix, model_metadata, methods=["GET"]),
                   Route(prefix + "/ready", model_ready, methods=["GET"])]
    routes.append(Route("/v2/{rest:path}", not_found))  # a JSON 404 for any other path under /v2
    app = Starlette(routes=routes, exception_handlers={V2Error: _error, HTTPException: _error})
    app.state.registry = None
    return app


app = make_app()
