"""A page for people at /ui: what is served, how each model was trained and checked, and a pad to try it.

    bentoml serve --host 127.0.0.1 --port 3000    # then open http://127.0.0.1:3000/ui

Routes (a Starlette app that `serve.service` mounts at "/" beside /v2; BentoML's mount passes on any
path that none of these match): GET /ui (serve/ui/index.html), /ui/app.js, /ui/style.css,
/ui/models.json (one card per served model) and /ui/plots/{name}/{file} (the training plots). No CDN,
no build step: three plain files, read once at import.

A card is read from the model store once, at start-up (`cards`, called by the service's __init__ with
its `Registry`): the entry's metadata as `python -m export` wrote it (`export.main.store_metadata`), its
creation time, the served model's contract, and the plots the export copied into the entry (plain files
only, as `serve.store` reads every file). The page itself calls the same HTTP endpoints as any client:
/v2/models/{name}/infer, and /predict for the product model. An image model's card takes a PNG or JPEG file,
sent as the BYTES input the server decodes (`serve.images`), and previews it resized as the server resizes it.
"""

import json
import logging
from datetime import timezone
from pathlib import Path
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serve.images import takes_images
from serve.store import CONTRACT_FILE, Registry, read_plain_file

logger = logging.getLogger("bentoml.train_to_deploy")

PAGE_DIR = Path(__file__).parent / "ui"
PLOTS = ("loss.png", "confusion.png", "predicted_vs_true.png")  # the only names read from an entry
FORM_FIELDS = 32  # a vector input up to this many features gets one number field each; beyond, JSON
_STATIC = {name: (PAGE_DIR / name).read_bytes() for name in ("index.html", "app.js", "style.css")}
_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}


def cards(registry: Registry) -> tuple[list[dict[str, Any]], dict[tuple[str, str], bytes]]:
    """One card per served name, sorted, and the plot files' bytes by (name, file)."""
    slot_of = {model.tag: slot for slot, (model, _) in registry.slots.items() if model is not None}
    out, plots = [], {}
    for name in sorted(registry.models):
        served = registry.models[name]
        card: dict[str, Any] = {"name": name, "tag": served.tag, "error": None if served.error is None
                                else str(served.error), "plots": [], "try": None}
        if served.tag is not None:
            try:
                card.update(_from_store(served.tag, plots))
            except Exception as e:  # a card is a courtesy: an unreadable entry shows as such, the server serves on
                logger.warning("/ui: the model card of %s is incomplete: %s", served.tag, e)
                card["card_error"] = "this entry's metadata could not be read (the server log says why)"
        if served.model is not None:
            card["contract"] = served.model.contract
            card["try"] = _try(served.model, slot_of.get(served.tag))
        out.append(card)
    return out, plots


def _from_store(tag: str, plots: dict[tuple[str, str], bytes]) -> dict[str, Any]:
    entry = bentoml.models.get(tag)
    meta = dict(entry.info.metadata)
    name = tag.split(":")[0]
    shown = []
    for file in meta.get("plots", []):
        if file not in PLOTS:  # metadata names files; only these names are ever opened
            continue
        try:
            plots[(name, file)] = read_plain_file(entry.path_of(file))
            shown.append(file)
        except (OSError, ValueError) as e:
            logger.warning("/ui: plot %s of %s not shown: %s", file, tag, e)
    card = {k: meta.get(k) for k in ("task", "arch", "parameters", "epoch", "train_seconds", "training_metrics",
                                     "test_metrics", "parity", "checkpoint_sha256", "versions", "formats", "variant",
                                     "quantization")}
    card["kind"] = entry.info.labels.get("kind")
    card["created"] = entry.info.creation_time.astimezone(timezone.utc).isoformat(timespec="seconds")
    card["plots"] = [f"/ui/plots/{name}/{file}" for file in shown]
    try:  # shown even when the model failed to load; a loaded model's own contract replaces it
        card["contract"] = json.loads(read_plain_file(entry.path_of(CONTRACT_FILE)))
    except (OSError, ValueError):
        card["contract"] = meta.get("contract")
    return card


def _try(model, slot: str | None) -> dict[str, Any]:
    """How the page lets a person try this model, and through which endpoint."""
    inputs = model.signature.inputs
    infer = f"/v2/models/{model.name}/infer"
    first = inputs[0]
    if slot == "product":
        return {"how": "product", "endpoint": "/predict"}
    text = [i for i in inputs if i.tokenizer is not None]
    if len(text) == 1 and all(i is text[0] or i.padding_mask_of == text[0].name for i in inputs):
        # Text in, as the server takes it (BYTES): the server tokenizes it and makes the masks.
        return {"how": "text", "endpoint": infer, "input": text[0].name, "max_length": text[0].max_length,
                "level": text[0].tokenizer.level, "target": model.signature.target,
                "classification": model.contract.get("kind") == "classification"}
    classifier = model.contract.get("kind") == "classification"
    if classifier and len(inputs) == 1 and len(first.sample_shape) == 3 and first.sample_shape[0] == 1:
        return {"how": "pad", "endpoint": infer, "input": first.name, "height": first.sample_shape[1],
                "width": first.sample_shape[2], "output": model.signature.outputs[0].name,
                "files": takes_images(first)}
    if len(inputs) == 1 and takes_images(first):  # a file picker: PNG or JPEG, sent as the BYTES the server decodes
        channels, height, width = first.sample_shape
        return {"how": "image", "endpoint": infer, "input": first.name, "channels": channels, "height": height,
                "width": width, "target": model.signature.target, "classification": classifier}
    if len(inputs) == 1 and len(first.sample_shape) == 1 and first.sample_shape[0] <= FORM_FIELDS:
        return {"how": "fields", "endpoint": infer, "input": first.name, "features": first.sample_shape[0]}
    return {"how": "json", "endpoint": infer}


# --- routes ----------------------------------------------------------------------------------------

def _static(name: str):
    body, media = _STATIC[name], _TYPES[name.rsplit(".", 1)[1]]

    async def view(request: Request) -> Response:
        return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})
    return view


async def models_json(request: Request) -> Response:
    body = json.dumps({"models": request.app.state.cards}, separators=(",", ":")).encode()
    return Response(body, media_type="application/json")


async def plot(request: Request) -> Response:
    data = request.app.state.plots.get((request.path_params["name"], request.path_params["file"]))
    if data is None:
        return Response(json.dumps({"error": "no such plot"}), status_code=404, media_type="application/json")
    return Response(data, media_type="image/png")


app = Starlette(routes=[
    Route("/ui", _static("index.html"), methods=["GET"]),
    Route("/ui/", _static("index.html"), methods=["GET"]),
    Route("/ui/app.js", _static("app.js"), methods=["GET"]),
    Route("/ui/style.css", _static("style.css"), methods=["GET"]),
    Route("/ui/models.json", models_json, methods=["GET"]),
    Route("/ui/plots/{name}/{file}", plot, methods=["GET"]),
])
app.state.cards, app.state.plots = [], {}  # the service's __init__ fills them once the models are loaded
