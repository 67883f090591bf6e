"""Serve exported models over HTTP with BentoML, on onnxruntime and numpy alone.

    bentoml serve --host 127.0.0.1 --port 3000      # from the repository root (reads bentofile.yaml)

Modules: `store` (choose a version of every model name in BentoML's model store, pins applied, and
open each once with onnxruntime), `contract` (a model's inputs and outputs, from its contract.json,
checked against its ONNX graph), `validate` (the typed request and response bodies, checked
strictly), `v2` (the Open Inference Protocol routes, for every model), `limits` (request size,
content-type and method guard, the documented maxima), `service` (the typed endpoints, /v2 mounted).
Nothing here imports torch, `train`, `models` or `export`: serving needs only the exported
artifacts.
"""
