"""The floor for bench/serving.py: our service's endpoints doing all of our service's work except the model.

The same typed request and response models (strict pydantic validation, the duplicate-key check), the
same middleware (body size, content type, method), the same traffic limits and timeout middleware, and
answers of the same size (one value per row of /predict_batch, ten probabilities, a model tag as long
as a real one); a constant takes the place of onnxruntime and the array conversions around it. The gap
between this and serve.service is what the model and its numpy handling cost per request.

/v2 is serve.v2's own app, mounted the same way, with a registry whose `product` answers a constant
array of the right shape instead of running onnxruntime: the same parsing, validation (against the
product's signature) and answer writing.
"""

import bentoml
import numpy as np

from serve.contract import Signature, TensorSpec
from serve.limits import JSON, MAX_CONCURRENCY, TIMEOUT_S, RequestGuard, mend_bentoml_timeout
from serve.store import Registry, Served
from serve.v2 import V2_POST_ROUTE, make_app
from serve.validate import (ClassifyInput, ClassifyOutput, PredictBatchInput, PredictBatchOutput, PredictInput,
                            PredictOutput, check_unique_keys, quiet_validation_errors)

TAG = "product:floorfloorfloorf"  # as long as a BentoML tag: name, colon, 16-character version


class ConstantProduct:
    """The product model's signature (x [n, 2] -> y [n, 1]); a constant for its output."""

    name, version = TAG.split(":")
    signature = Signature((TensorSpec("x", "float32", (2,)),), (TensorSpec("y", "float32", (1,)),))
    inputs, outputs = signature.inputs, signature.outputs
    variant = "fp32"  # infer answers parameters.variant

    def run_named(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        rows = len(feeds["x"])
        return [np.full((rows, 1), 12.0, dtype=np.float32) for _ in names]


v2_app = make_app()
v2_app.state.registry = Registry({"product": Served("product", TAG, ConstantProduct(), None)})


@bentoml.asgi_app(v2_app, path="/")
@bentoml.service(workers=1, traffic={"timeout": TIMEOUT_S, "max_concurrency": MAX_CONCURRENCY})
class Floor:
    @bentoml.api
    def predict(self, body: PredictInput, /) -> PredictOutput:
        check_unique_keys(body)
        return PredictOutput(y=12.0, model=TAG, extrapolated=False)

    @bentoml.api
    def predict_batch(self, body: PredictBatchInput, /) -> PredictBatchOutput:
        check_unique_keys(body)
        rows = len(body.x)
        return PredictBatchOutput(y=[12.0] * rows, model=TAG, extrapolated=[False] * rows)

    @bentoml.api
    def classify(self, body: ClassifyInput, /) -> ClassifyOutput:
        check_unique_keys(body)
        return ClassifyOutput(label=0, class_name="T-shirt/top", probabilities=[0.1] * 10, model=TAG)


Floor.add_asgi_middleware(RequestGuard, routes={"/predict": JSON, "/predict_batch": JSON, "/classify": JSON},
                          patterns={V2_POST_ROUTE: JSON})
mend_bentoml_timeout()
quiet_validation_errors()
