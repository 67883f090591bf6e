"""Serve exported models over HTTP with BentoML, on onnxruntime and numpy alone.

    bentoml serve --host 127.0.0.1 --port 3000      # from the repository root (reads bentofile.yaml)

Modules: `store` (find the latest exported model of each task in BentoML's model store and open
it with onnxruntime), `validate` (the request and response bodies, checked strictly), `limits`
(request size and content-type guard, the documented maxima), `service` (the endpoints).
Nothing here imports torch, `train`, `models` or `export`: serving needs only the exported
artifacts.
"""
