"""Turn a training checkpoint into deployable artifacts and prove they compute what it computes.

    python -m export --format all --checkpoint runs/product/best.pt --out runs/product/export

writes `model.onnx` (self-contained, normalization inside, raw units in and out),
`model.torchscript.pt` and `parity.json`, and, once parity holds, registers the artifacts in
BentoML's model store as `<task>:<version>`. Modules: `contract` (what the artifacts take and
return), `artifacts` (tracing and writing), `parity` (eager vs TorchScript vs onnxruntime),
`store` (registration), `main` (the command).
"""
