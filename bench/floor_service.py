"""BentoML's own floor: the same endpoints and request bodies as serve.service, answered with a constant.

Started by bench/serving.py; the gap between it and our service is what our validation and
onnxruntime cost per request.
"""

import bentoml
from pydantic import BaseModel, ConfigDict


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # parses the JSON, checks nothing


@bentoml.service(workers=1, traffic={"timeout": 30})
class Floor:
    @bentoml.api
    def predict(self, body: Body, /) -> dict:
        return {"y": 12.0, "model": "floor", "extrapolated": False}

    @bentoml.api
    def predict_batch(self, body: Body, /) -> dict:
        return {"y": [12.0], "model": "floor", "extrapolated": [False]}

    @bentoml.api
    def classify(self, body: Body, /) -> dict:
        return {"label": 0, "class_name": "floor", "probabilities": [0.1] * 10, "model": "floor"}
