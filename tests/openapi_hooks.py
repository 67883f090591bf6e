"""Schemathesis hooks for tests/test_openapi.py (loaded through SCHEMATHESIS_HOOKS by the `schemathesis run` it starts).

Two rules of the service cannot be written in JSON Schema, so /docs.json states them in words and a
request that breaks one is schema-valid yet refused. Schemathesis' positive_data_acceptance check
("a schema-valid request is accepted") is replaced by `accepts_valid_data`, which is that check except
for exactly these refusals, each recognised by its status, its operation and its message:
- /classify_png: the PNG's pixel size (28x28) is in the file's header, not in anything JSON Schema sees:
  422 "the PNG is WxH pixels; send 28x28";
- /v2/models/{name}[/versions/{version}]/infer: what a model takes depends on the model (its metadata,
  GET /v2/models/{name}): the input and output names, the shape after the batch axis, the number of
  values (the product of the shape), the same rows for every input, an input's valid range. 400 with
  the message `serve.v2` writes for each of those. Any other 400 to a schema-valid body is a finding.

PNG bodies are drawn as real PNG files (`png_files`): mostly 28x28 in every accepted mode, sometimes
another size, so the fuzzer reaches the classifier and the 422 both.
"""

import io
import json
import re

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance

PNG_SIZE = re.compile(r"the PNG is \d+x\d+ pixels; send 28x28")
INPUT = r"inputs\[\d+\]( \([^)]*\))?"
MODEL_RULES = re.compile("|".join([
    INPUT + r"\.name is .*; this model takes .*",                     # not one of the model's input names
    r"input '.*' is given twice; send each input once",
    r"missing input\(s\) \[.*\]; this model takes .*",
    INPUT + r"\.shape is .*; send \[n, [\d, ]*\] with 1 <= n <= \d+",   # the sample shape, or n over MAX_ROWS
    INPUT + r"\.data has \d+ values; shape \[.*\] needs \d+",          # count != product(shape)
    INPUT + r"\.datatype is .*; send .*",                              # the model's datatype for the input
    INPUT + r"\.data holds .*; send numbers",                          # nested deeper, or booleans or text
    INPUT + r"\.data holds .*; send true or false",                    # a BOOL input
    INPUT + r"\.data holds .*; an INT64 input takes integers",         # an INT64 input
    INPUT + r"\.data\[\d+\] is .*, outside the valid range \[.*\]",    # the contract's range
    INPUT + r" has \d+ rows and an earlier input \d+; send the same rows for every input",
    r"outputs\[\d+\]\.name is .*; this model gives .*",
    r"output '.*' is requested twice",
]))


def _tolerated(case, response) -> bool:
    try:
        message = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    path = case.operation.path
    if path == "/classify_png":
        return response.status_code == 422 and PNG_SIZE.fullmatch(message) is not None
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return response.status_code == 400 and MODEL_RULES.fullmatch(message) is not None
    return False


@schemathesis.check
def accepts_valid_data(ctx, response, case):
    """positive_data_acceptance, but for the refusals of rules JSON Schema cannot state (see the module docstring)."""
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if _tolerated(case, response):
            return None
        raise


@st.composite
def png_files(draw) -> bytes:
    side = draw(st.sampled_from([28] * 6 + [1, 27, 29, 64]))
    other = draw(st.sampled_from([side, 28, 3]))
    width, height = (side, other) if draw(st.booleans()) else (other, side)
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)
    mode = draw(st.sampled_from(["L", "LA", "P", "RGB", "RGBA", "1"]))
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


schemathesis.openapi.media_type("image/png", png_files())
