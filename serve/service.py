"""The HTTP service: the product regressor and the image classifier, on onnxruntime.

    bentoml serve --host 127.0.0.1 --port 3000      # from the repository root (bentofile.yaml names this class)

    curl -s -X POST localhost:3000/predict -H 'Content-Type: application/json' -d '{"x1": 3, "x2": 4}'
    -> {"y": 12.01..., "model": "product:...", "extrapolated": false}

Endpoints (all POST): /predict, /predict_batch (product); /classify (JSON pixels), /classify_png (a PNG
body) (classifier). GET /livez, /readyz; the Swagger UI at / has an example body for each JSON endpoint
(the page, which loads nothing from other hosts, and the document's title, description and version:
`serve.openapi`). The page for people, /ui (`serve.ui`, mounted here): each model's card and a pad to try
it. Every model in the store, under its own name, over the Open Inference Protocol: /v2 (`serve.v2`, a
Starlette app mounted here). Which models are served and how to pin them: `serve.store`; the models are
loaded once, in __init__, into one `Registry` that the typed endpoints and /v2 share (__init__ hands it to
the mounted apps). Input checks: `serve.validate` (typed), `serve.v2` (v2). Size, content-type and method
limits: `serve.limits`, for both.

BentoML builds one Starlette app whose routes include the mounted /v2 app, and wraps all of it in its
middleware: the 429 (max_concurrency) and 504 (timeout) below apply to /v2 as to the typed endpoints
(tests/test_serve_v2.py holds both). BentoML exempts only /livez, /readyz, /healthz and /metrics from
the 429, so probes belong on those, not on /v2/health/*.

Errors are JSON with an "error" message: 400 for a body that does not validate (BentoML's answer
to a pydantic error, with a "detail" list) or is not a PNG, 405 a method but POST, 413 too big, 415
wrong Content-Type, 422 for a PNG of the wrong size or mode and for a model output that is not
finite, 429 more than MAX_CONCURRENCY requests in flight, 503 when the endpoint's model is missing
or broken (the message says how to train and export it), 504 no answer begun within TIMEOUT_S,
500 when onnxruntime fails on input that passed validation (logged; the server keeps serving).

Readiness: nothing answers, /livez and /readyz included, until __init__ has loaded the models
(BentoML's arbiter holds the listening socket from the start, so a connection opens and waits).
Then /readyz is 200, unless a model this server was told to serve (the newest registered, a pinned
tag, a Bento's own) failed to load: then it stays 503, so a rolling deployment keeps the old
servers; the log's ERROR line says why, and the other task's endpoints still answer. A task with
nothing registered does not hold readiness back: its endpoints answer 503 with how to fill it.

Shutdown (SIGTERM, as `docker stop` and Kubernetes send it): requests in flight finish, every answer from then
on says `Connection: close`, and a kept-alive connection is closed only after such an answer (`serve.drain`).

Limits (`serve.limits`) can be changed without editing code, through BentoML's configuration:
    BENTOML_CONFIG_OVERRIDES='{"services": {"TrainToDeploy": {"traffic": {"max_concurrency": 64, "timeout": 10}}}}'

No adaptive batching: one of these models answers a request in microseconds, far below what
HTTP and JSON cost per request, so there is nothing for a batch to amortize, and BentoML's
dispatcher sheds load with 503 when its latency target is missed. Clients with many inputs send
them together to /predict_batch.
"""

from typing import Annotated

import bentoml
import numpy as np
from bentoml.models import BentoModel
from bentoml.validators import ContentType
from starlette.responses import JSONResponse

from serve import openapi
from serve.drain import mend_uvicorn_shutdown
from serve.limits import JSON, MAX_CONCURRENCY, PNG, TIMEOUT_S, RequestGuard, mend_bentoml_timeout
from serve.store import ModelRunError, OnnxModel, load_registry, registered_tags
from serve.ui import app as ui_app, cards
from serve.v2 import V2_POST_ROUTE, app as v2_app, binary_limit
from serve.validate import (ClassifyInput, ClassifyOutput, InputError, PredictBatchInput, PredictBatchOutput,
                            PredictInput, PredictOutput, check_unique_keys, png_pixels, quiet_validation_errors)


PIXEL_SCALE = np.float32(255)  # /classify and /classify_png take pixels 0..255; the models take [0, 1]


def error(status: int, message: str) -> JSONResponse:
    # Returned, not raised: BentoML renders a raised BentoMLException under 500 as a generic message
    # and a 4xx one as a JSON list, so endpoints build their error responses themselves.
    return JSONResponse({"error": message}, status_code=status)


# /docs.json: read from the class below at the first request, when it exists.
docs_app = openapi.make_app(lambda: TrainToDeploy.openapi_spec.asdict())


# One worker process: a request is about 2 ms of Python HTTP and JSON work around 15-70 us of
# onnxruntime, and this project's machines have 2 shared cores; on a bigger machine, more workers
# scale with the cores (BentoML splits max_concurrency between them). The limits: `serve.limits`.
@bentoml.asgi_app(docs_app, path="/")  # /docs.json: BentoML's document, corrected (see serve.openapi)
@bentoml.asgi_app(v2_app, path="/")  # its routes start with /v2 (see serve.v2.make_app)
@bentoml.asgi_app(ui_app, path="/")  # the page for people, /ui (serve.ui); also passive: only its routes
@bentoml.service(workers=1, traffic={"timeout": TIMEOUT_S, "max_concurrency": MAX_CONCURRENCY})
class TrainToDeploy:
    def __init__(self) -> None:
        # Served from a built Bento: the model tags it was built with (`bento` is set once BentoML loads one).
        bento = TrainToDeploy.bento
        packed = [str(m.tag) for m in bento.info.all_models] if bento is not None else None
        # Every model, loaded once in this worker; the typed endpoints and /v2 share them.
        self.registry = load_registry(packed)
        # A slot without a usable model is None with the reason; its endpoints answer 503 with it.
        self.product, self.product_error = self.registry.slots["product"]
        self.classifier, self.classifier_error = self.registry.slots["classifier"]
        self.ready = self.registry.ready
        v2_app.state.registry = self.registry  # the mounted app reads the same registry
        ui_app.state.cards, ui_app.state.plots = cards(self.registry)  # read from the store once, like the models

    async def __is_ready__(self) -> bool:
        """/readyz: False (503) while a model that should be served is broken; see the module docstring."""
        return self.ready

    @bentoml.api
    def predict(self, body: PredictInput, /) -> PredictOutput:
        """X1*X2 for one pair; `extrapolated` is true when an input is outside the training range."""
        try:
            check_unique_keys(body)
            if self.product is None:
                return error(503, self.product_error)
            y, extrapolated = self._regress(np.array([[body.x1, body.x2]], dtype=np.float32))
        except (InputError, ModelRunError) as e:  # a ModelRunError is logged where it happened
            return error(e.status, str(e))
        return PredictOutput(y=y[0], model=self.product.tag, extrapolated=extrapolated[0])

    @bentoml.api
    def predict_batch(self, body: PredictBatchInput, /) -> PredictBatchOutput:
        """X1*X2 for each row of `x`, in order."""
        try:
            check_unique_keys(body)
            if self.product is None:
                return error(503, self.product_error)
            y, extrapolated = self._regress(np.array(body.x, dtype=np.float32))
        except (InputError, ModelRunError) as e:  # a ModelRunError is logged where it happened
            return error(e.status, str(e))
        return PredictBatchOutput(y=y, model=self.product.tag, extrapolated=extrapolated)

    @bentoml.api
    def classify(self, body: ClassifyInput, /) -> ClassifyOutput:
        """The class of one 28x28 image given as rows of pixel values 0..255."""
        try:
            check_unique_keys(body)
            if self.classifier is None:
                return error(503, self.classifier_error)
            return self._classify(np.array(body.image, dtype=np.float32))
        except (InputError, ModelRunError) as e:  # a ModelRunError is logged where it happened
            return error(e.status, str(e))

    @bentoml.api
    def classify_png(self, png: Annotated[bytes, ContentType(PNG)], /) -> ClassifyOutput:
        """The class of one 28x28 PNG image sent as the request body (Content-Type: image/png)."""
        if self.classifier is None:
            return error(503, self.classifier_error)
        try:
            return self._classify(png_pixels(png))
        except (InputError, ModelRunError) as e:  # a ModelRunError is logged where it happened
            return error(e.status, str(e))

    def _regress(self, x: np.ndarray) -> tuple[list[float], list[bool]]:
        """Predictions and extrapolation flags for (rows, 2) raw inputs."""
        y = self.product.run(x)[:, 0]  # (rows, 1) -> (rows,)
        if not np.isfinite(y).all():
            rows = np.flatnonzero(~np.isfinite(y))[:10].tolist()
            raise InputError(f"the model's output is not finite for row(s) {rows}: inputs this far outside "
                             f"the training range overflow float32", status=422)
        low, high = np.array(self.product.contract["train_range"], dtype=np.float64).T  # [low, high) per input
        extrapolated = ((x < low) | (x >= high)).any(axis=1)
        return [float(v) for v in y], [bool(v) for v in extrapolated]

    def _classify(self, pixels: np.ndarray) -> ClassifyOutput:
        """The answer for one (28, 28) image of pixels in 0..255."""
        model: OnnxModel = self.classifier
        image = (pixels / PIXEL_SCALE).reshape(1, 1, 28, 28)  # HTTP pixels 0..255 -> the model's [0, 1]
        logits = model.run(image)[0].astype(np.float64)  # (10,)
        if not np.isfinite(logits).all():
            raise InputError("the model's output is not finite for this image", status=422)
        p = np.exp(logits - logits.max())  # softmax, shifted so exp cannot overflow
        p /= p.sum()
        label = int(p.argmax())
        return ClassifyOutput(label=label, class_name=model.contract["classes"][label],
                              probabilities=[float(v) for v in p], model=model.tag)


TrainToDeploy.add_asgi_middleware(RequestGuard, routes={
    "/predict": JSON, "/predict_batch": JSON, "/classify": JSON, "/classify_png": PNG,
}, patterns={V2_POST_ROUTE: JSON}, binary_limit=binary_limit)
mend_bentoml_timeout()  # BentoML's 504 timer, without the memory it holds after each request
mend_uvicorn_shutdown()  # at SIGTERM, answers say Connection: close; kept-alive clients are not cut off
quiet_validation_errors()
# The models the endpoints would serve now, as references: `bentoml build` records their tags in the
# Bento, and `bentoml export` / `bentoml containerize` copy their files in. Only models that exist are
# named, so an empty store still serves (with 503s) instead of failing to start.
TrainToDeploy.models.extend(BentoModel(tag) for tag in registered_tags())
