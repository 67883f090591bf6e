"""/docs.json tells the truth: it names every route and every status the service answers, each error
body validates against its documented schema, and a schema fuzzer finds nothing against a real server.

The fast tests run the service in this process (`TrainToDeploy.to_asgi()`, an empty model store, so the
typed endpoints answer 503): its route table against the document, and real answers against their
documented schemas. The slow one runs `schemathesis run` with every check against a real `bentoml serve`
of the exported product and fashion-mnist models (tests/openapi_hooks.py: the two rules JSON Schema
cannot state, tolerated exactly); the seed is printed, so a failure replays with
`schemathesis run URL/docs.json --seed SEED ...` (the command is in the failure message).
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from bentoml._internal.server.http.traffic import MaxConcurrencyMiddleware
from serving import Server, copy_store, env_for, exported, png
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from serve.limits import MAX_BODY_BYTES

# Routes that are no API: the Swagger UI and its files, the documents themselves, `/v2/` (the same as
# /v2) and v2's catch-all JSON 404 for any other path under /v2, and the page for people (/ui: its HTML,
# script, style, plots and the cards' JSON, which only that page reads; tests/test_ui.py checks them).
NOT_API = {"/", "/docs.js", "/docs.json", "/schema.json", "/v2/", "/v2/{rest:path}",
           "/ui", "/ui/", "/ui/app.js", "/ui/style.css", "/ui/models.json", "/ui/plots/{name}/{file}"}
INFRA = {"/livez", "/readyz", "/healthz", "/metrics"}  # BentoML's probes
TYPED = {"/predict", "/predict_batch", "/classify", "/classify_png"}

# What each route's own handler answers, beyond 200 (the middleware's answers are added in `expected`).
HANDLER = {
    "/readyz": {503},                            # a model that should be served failed to load
    "/v2/health/ready": {503},
    **{p: {400, 422, 500, 503} for p in TYPED},  # invalid body; non-finite output or a wrong PNG; onnxruntime failed; no model
    **{p: {404, 503} for p in ("/v2/models/{name}", "/v2/models/{name}/ready",
                               "/v2/models/{name}/versions/{version}", "/v2/models/{name}/versions/{version}/ready")},
    **{p: {400, 404, 422, 500, 503} for p in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")},
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    os.environ["BENTOML_HOME"] = str(tmp_path_factory.mktemp("empty-store"))  # read when the service loads
    try:
        from serve.service import TrainToDeploy
        with TestClient(TrainToDeploy.to_asgi()) as c:  # runs the service's __init__: an empty registry
            yield c
    finally:
        os.environ.pop("BENTOML_HOME")


@pytest.fixture(scope="module")
def spec(client) -> dict:
    r = client.get("/docs.json")
    assert r.status_code == 200
    return r.json()


def route_table(app) -> dict[str, set[str]]:
    """path -> methods, for every route the running app answers (the mounted /v2 app's included)."""
    table = {}
    for route in app.router.routes:
        if isinstance(route, Mount) and route.path == "":  # a mounted app at "/" (BentoML's PassiveMount)
            table.update(route_table(route.app))
        elif isinstance(route, Route):
            table[route.path] = set(route.methods) - {"HEAD"}
    return table


def guarded(client) -> set[str]:
    """The paths whose POST is behind RequestGuard (405/413/415), as the app's middleware is configured."""
    from serve.service import TrainToDeploy
    from serve.limits import RequestGuard
    guards = [options for cls, options in TrainToDeploy.middlewares if cls is RequestGuard]
    assert len(guards) == 1
    table = route_table(client.app)
    return {p for p in table if "POST" in table[p] and RequestGuard(None, **guards[0]).expected_type(
        p.replace("{name}", "m").replace("{version}", "v")) is not None}


def expected(client) -> dict[str, set[int]]:
    """The statuses each API route can answer, from the app's routes and middleware."""
    table = {p: m for p, m in route_table(client.app).items() if p not in NOT_API}
    posts = guarded(client)
    statuses = {}
    for path in table:
        s = {200, 405, 504} | HANDLER.get(path, set())  # 405: any other method; 504: BentoML's timeout wraps all
        if path not in MaxConcurrencyMiddleware.BYPASS_PATHS:
            s.add(429)
        if path in posts:
            s |= {413, 415}
        statuses[path] = s
    return statuses


def test_document_is_the_services_own(spec):
    from importlib import metadata
    assert spec["info"]["title"] == "train-to-deploy"
    assert spec["info"]["version"] == metadata.version("train-to-deploy")
    assert spec["info"]["description"].startswith("Take a PyTorch model") and "contact" not in spec["info"]


def test_document_names_every_route_and_method(client, spec):
    table = {p: m for p, m in route_table(client.app).items() if p not in NOT_API}
    documented = {p: {m.upper() for m in item} for p, item in spec["paths"].items()}
    assert documented == table


def test_document_lists_every_status_each_route_answers(client, spec):
    documented = {p: {int(s) for op in item.values() for s in op["responses"]} for p, item in spec["paths"].items()}
    assert documented == expected(client)
    assert set(HANDLER) <= set(documented), "a route in HANDLER is gone from the service"


def validate(spec: dict, path: str, method: str, response) -> None:
    """The answer's status is documented for the operation, with its content type and a schema the body fits."""
    responses = spec["paths"][path][method.lower()]["responses"]
    assert str(response.status_code) in responses, f"{method} {path}: {response.status_code} is not documented"
    documented = responses[str(response.status_code)]
    content_type = response.headers["content-type"].split(";")[0]
    assert content_type in documented["content"], f"{method} {path} {response.status_code}: {content_type}"
    schema = documented["content"][content_type]["schema"]
    body = response.json() if content_type == "application/json" else response.text
    jsonschema.validate(body, {**schema, "components": spec["components"]})
    for name in documented.get("headers", {}):
        assert name in response.headers, f"{method} {path} {response.status_code}: no {name} header"


# Requests whose answers do not need a model: (method, request path, documented path, body, content type, status).
ANSWERS = [
    ("POST", "/predict", "/predict", {"x1": 3, "x2": 4}, "application/json", 503),  # the store is empty
    ("POST", "/predict", "/predict", {"x1": "3"}, "application/json", 400),
    ("POST", "/predict", "/predict", '{"x1": 3, "x2": 4, "x1": 5}', "application/json", 400),
    ("POST", "/predict_batch", "/predict_batch", {"x": [[1, 2, 3]]}, "application/json", 400),
    ("POST", "/classify", "/classify", {"image": [[0] * 28] * 28}, "application/json", 503),
    ("POST", "/classify", "/classify", {"image": [[256] * 28] * 28}, "application/json", 400),
    ("POST", "/classify_png", "/classify_png", png([[0] * 28] * 28), "image/png", 503),
    ("POST", "/predict", "/predict", {"x1": 3, "x2": 4}, "text/plain", 415),
    ("POST", "/classify_png", "/classify_png", b"x" * (MAX_BODY_BYTES + 1), "image/png", 413),
    ("GET", "/predict_batch", "/predict_batch", None, None, 405),
    ("GET", "/v2", "/v2", None, None, 200),
    ("POST", "/v2", "/v2", None, None, 405),
    ("GET", "/v2/health/live", "/v2/health/live", None, None, 200),
    ("GET", "/v2/health/ready", "/v2/health/ready", None, None, 200),
    ("GET", "/v2/models/nope", "/v2/models/{name}", None, None, 404),
    ("GET", "/v2/models/nope/versions/1/ready", "/v2/models/{name}/versions/{version}/ready", None, None, 404),
    ("POST", "/v2/models/nope/infer", "/v2/models/{name}/infer", {"inputs": []}, "application/json", 404),
    ("PUT", "/v2/models/nope/infer", "/v2/models/{name}/infer", None, None, 405),
    ("POST", "/v2/models/nope/infer", "/v2/models/{name}/infer", "{}", "text/csv", 415),
    ("GET", "/livez", "/livez", None, None, 200),
    ("POST", "/readyz", "/readyz", None, None, 405),
    ("POST", "/metrics", "/metrics", None, None, 405),  # (its 200 needs the server's Prometheus setup)
]


@pytest.mark.parametrize("method, url, path, body, content_type, status", ANSWERS,
                         ids=[f"{a[0]} {a[1]} {a[5]}" for a in ANSWERS])
def test_answers_fit_their_documented_schema(client, spec, method, url, path, body, content_type, status):
    headers = {"Content-Type": content_type} if content_type else {}
    data = json.dumps(body) if isinstance(body, dict) else body
    r = client.request(method, url, content=data, headers=headers)
    assert r.status_code == status, r.text[:300]
    operation = next(iter(spec["paths"][path]))  # a 405 is documented under the route's one operation
    validate(spec, path, operation, r)


# --- the fuzzer ------------------------------------------------------------------------------------

# The budget: about 1,500 requests in about 60 s on 2 busy cores. Coverage (every documented boundary and
# status) and examples run in full; fuzzing and the stateful phase (which follows GET /v2/models/{name}
# to its infer with a real model's name) are capped here.
CONFIG = """
[phases.fuzzing.generation]
max-examples = 25
[phases.stateful.generation]
max-examples = 10
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = exported(tmp_path_factory)
    root = tmp_path_factory.mktemp("openapi")
    srv = Server(copy_store(base, root / "bentoml"), root / "serve.log")
    yield srv.wait_ready()
    srv.stop()


@pytest.mark.slow
def test_schemathesis_finds_nothing(server, tmp_path):
    seed = int(os.environ.get("T2D_FUZZ_SEED", random.randrange(2**31)))  # set it to replay a run
    print(f"schemathesis seed: {seed} (replay: T2D_FUZZ_SEED={seed})")
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
               f"http://127.0.0.1:{server.port}/docs.json", "--checks", "all",
               # replaced by tests/openapi_hooks.py's accepts_valid_data, which is it but for two stated rules
               "--exclude-checks", "positive_data_acceptance",
               "--seed", str(seed), "--workers", "1", "--request-timeout", "30", "--no-color"]
    env = {**env_for(server.log_path.parent), "SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("openapi_hooks.py"))}
    start = time.monotonic()
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    print(f"schemathesis: {time.monotonic() - start:.0f} s; {run.stdout.strip().splitlines()[-1]}")
    summary = "\n".join(line for line in run.stdout.splitlines() if "generated" in line)
    assert run.returncode == 0 and "generated" in summary, (
        f"schemathesis found a problem (seed {seed}); replay with T2D_FUZZ_SEED={seed} or\n"
        f"SCHEMATHESIS_HOOKS={env['SCHEMATHESIS_HOOKS']} {' '.join(command[1:])}\n"
        f"{run.stdout[-12000:]}\n{run.stderr[-3000:]}")
    print(summary)
