"""The floor for bench/serving.py: our service's endpoints doing all of our service's work except the model.

The same typed request and response models (strict pydantic validation, the duplicate-key check), the
same middleware (body size, content type, method), the same traffic limits and timeout middleware, and
answers of the same size (one value per row of /predict_batch, ten probabilities, a model tag as long
as a real one); a constant takes the place of onnxruntime and the array conversions around it. The gap
between this and serve.service is what the model and its numpy handling cost per request.
"""

import bentoml

from serve.limits import JSON, MAX_CONCURRENCY, TIMEOUT_S, RequestGuard, mend_bentoml_timeout
from serve.validate import (ClassifyInput, ClassifyOutput, PredictBatchInput, PredictBatchOutput, PredictInput,
                            PredictOutput, check_unique_keys, quiet_validation_errors)

TAG = "product:floorfloorfloorf"  # as long as a BentoML tag: name, colon, 16-character version


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


Floor.add_asgi_middleware(RequestGuard, routes={"/predict": JSON, "/predict_batch": JSON, "/classify": JSON})
mend_bentoml_timeout()
quiet_validation_errors()
