"""Request and response bodies, validated strictly, and PNG decoding.

BentoML parses each JSON body into these models with pydantic and answers a failure with 400
`{"error": "1 validation error for PredictInput", "detail": [{"loc": ["x1"], "msg": "Input should
be a finite number", "type": "finite_number", ...}]}`. Strict models make that the answer for every
malformed body: a string or a bool where a number belongs, a missing or an extra field, a row of 4
numbers where 2 belong (never silently reshaped), NaN, Infinity, a number that overflows float32,
too many rows, an empty or non-JSON body, JSON nested deeper than 200 levels (pydantic's parser
stops there, so 100,000 `[` are a fast 400, not a RecursionError). A body that names a field twice is
a 400 too (`check_unique_keys`): a JSON parser keeps the last of duplicate keys, and another parser
on the way (a proxy, a log reader) may keep the first.
"""

import io
import logging
from typing import Annotated

import bentoml
import numpy as np
from PIL import Image
from pydantic import AfterValidator, ConfigDict, Field, ValidationError

from serve.limits import MAX_ROWS, body_quotes

FLOAT32_MAX = float(np.finfo(np.float32).max)  # about 3.4e38
IMAGE_SIDE = 28
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fits_float32(v: float) -> float:
    # The model computes in float32; a larger number would reach it as inf.
    if abs(v) > FLOAT32_MAX:
        raise ValueError(f"{v:g} does not fit in float32 (|x| <= 3.4e38)")
    return v


Number = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_fits_float32)]
Pixel = Annotated[float, Field(allow_inf_nan=False, ge=0, le=255)]
Row = Annotated[list[Pixel], Field(min_length=IMAGE_SIDE, max_length=IMAGE_SIDE)]


class Strict(bentoml.IODescriptor):
    # strict: "3" and true are not numbers; forbid: a misspelled field is an error, not ignored.
    # An IODescriptor is used by BentoML as it is, so its errors name this class, not a generated one.
    model_config = ConfigDict(strict=True, extra="forbid")


class PredictInput(Strict):
    """One (X1, X2) pair in raw units."""

    model_config = ConfigDict(json_schema_extra={"example": {"x1": 3.0, "x2": 4.0}})
    x1: Number
    x2: Number


class PredictBatchInput(Strict):
    """Rows of [X1, X2] in raw units."""

    model_config = ConfigDict(json_schema_extra={"example": {"x": [[3.0, 4.0], [1.5, 2.0], [12.0, 0.5]]}})
    x: Annotated[list[tuple[Number, Number]], Field(min_length=1, max_length=MAX_ROWS,
                                                    description=f"1 to {MAX_ROWS} rows of [x1, x2]")]


def _example_image() -> list[list[float]]:
    # A bright upright bar on black, roughly a "Trouser" in Fashion-MNIST or a "1" in MNIST.
    image = np.zeros((IMAGE_SIDE, IMAGE_SIDE))
    image[4:24, 11:17] = 255.0
    return image.tolist()


class ClassifyInput(Strict):
    """One 28x28 grayscale image, rows of pixel values in 0..255 (0 is black)."""

    model_config = ConfigDict(json_schema_extra={"example": {"image": _example_image()}})
    image: Annotated[list[Row], Field(min_length=IMAGE_SIDE, max_length=IMAGE_SIDE,
                                      description="28 rows of 28 pixel values in 0..255")]


class PredictOutput(bentoml.IODescriptor):
    y: float = Field(description="predicted X1*X2")
    model: str = Field(description="tag of the model that answered")
    extrapolated: bool = Field(description="an input lies outside the training range [1, 10)")


class PredictBatchOutput(bentoml.IODescriptor):
    y: list[float]
    model: str
    extrapolated: list[bool]


class ClassifyOutput(bentoml.IODescriptor):
    label: int = Field(description="index of the most probable class")
    class_name: str
    probabilities: list[float] = Field(description="softmax over the classes, in label order")
    model: str


class InputError(Exception):
    """A request the endpoint cannot answer; `status` is the HTTP status (4xx) to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_unique_keys(body: Strict) -> None:
    """InputError (400) if the JSON body behind `body`, which validated, named one of its fields twice.

    Counted, not parsed again: a body that validated holds no string but its keys (every value is a
    number or a list of numbers, no object is nested), and no field name contains a quote, so it has
    exactly two '"' bytes per key; more than two per field means a key was repeated. (A string field
    added to these models would break that count: valid requests would get this 400 and the tests fail.)
    """
    quotes = body_quotes.get()  # None outside an HTTP request (and for PNG bodies)
    fields = type(body).model_fields
    if quotes is not None and quotes > 2 * len(fields):
        raise InputError(f"the body names a field more than once; send each of {', '.join(fields)} exactly once")


def png_pixels(data: bytes) -> np.ndarray:
    """(28, 28) float32 pixels in 0..255 from the bytes of a PNG file; InputError if it is not one."""
    if not data.startswith(PNG_SIGNATURE):
        raise InputError("the body is not a PNG file (it does not start with the PNG signature)")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            # Checked before decoding: the header alone gives the size, so a huge image is never inflated.
            if image.size != (IMAGE_SIDE, IMAGE_SIDE):
                raise InputError(f"the PNG is {image.size[0]}x{image.size[1]} pixels; send 28x28", status=422)
            # 16-bit PNGs ("I;16", "I") would be clipped to 255 by convert("L"): refuse them rather than guess.
            if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
                raise InputError(f"the PNG has mode {image.mode}; send an 8-bit grayscale (or RGB) PNG", status=422)
            gray = image.convert("L")  # colour to luminance; alpha is dropped
    except InputError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib errors... on broken files
        raise InputError(f"the PNG cannot be decoded: {str(e).strip() or type(e).__name__}") from None
    return np.asarray(gray, dtype=np.float32)


class OneLineValidationErrors(logging.Filter):
    """BentoML logs every body that fails validation as an ERROR with a full traceback; a client's
    mistake is worth one INFO line (the response already tells the client what was wrong)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            record.msg, record.args = "%s: answered 400, the body failed validation as %s", (record.getMessage(), error.title)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_validation_errors() -> None:
    # The logger of BentoML's `log_exception` (bentoml/_internal/server/http_app.py). If a later
    # BentoML moves it, the filter does nothing and the tracebacks come back: harmless.
    logging.getLogger("bentoml._internal.server.http_app").addFilter(OneLineValidationErrors())
