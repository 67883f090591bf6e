"""Encoded images for an image input (`serve.images`, through `serve.tensors.parse_inputs` as /v2 calls it): real
Pillow files in, the rows the model would get out, compared with what Pillow itself gives and with values worked
out by hand. The served end to end (tritonclient, curl's JSON, onnxruntime): tests/test_resnet.py.
"""

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from serve.contract import TensorSpec
from serve.images import MAX_PIXELS, takes_images
from serve.limits import BINARY_CEILING
from serve.tensors import V2Error, parse_inputs
from serve.v2 import check_parameters

RGB = TensorSpec("image", "float32", (3, 16, 20), range=(0.0, 1.0))
GREY = TensorSpec("image", "float32", (1, 40, 20), range=(-1.0, 1.0))


def encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def as_json(files: list[bytes], **parameters) -> dict:
    return {"name": "image", "shape": [len(files)], "datatype": "BYTES",
            "data": [base64.b64encode(f).decode() for f in files], "parameters": {"content_type": "base64",
                                                                                    **parameters}}


def as_binary(files: list[bytes]) -> tuple[dict, memoryview]:
    data = b"".join(struct.pack("<I", len(f)) + f for f in files)
    return {"name": "image", "shape": [len(files)], "datatype": "BYTES",
            "parameters": {"binary_data_size": len(data)}}, memoryview(data)


def rows(entry: dict, spec: TensorSpec = RGB, binary: memoryview = memoryview(b"")) -> np.ndarray:
    feeds, _ = parse_inputs([entry], (spec,), binary, check_parameters)
    return feeds["image"]


def refusal(entry: dict, spec: TensorSpec = RGB, binary: memoryview = memoryview(b"")) -> V2Error:
    with pytest.raises(V2Error) as e:
        rows(entry, spec, binary)
    assert "\n" not in str(e.value)
    return e.value


def photo(size=(50, 30), mode="RGBA", seed=0) -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def test_which_inputs_take_images():
    assert takes_images(RGB) and takes_images(GREY)
    assert not takes_images(TensorSpec("image", "float32", (3, 16, 20)))  # no range: how to scale 0..255 is unknown
    assert not takes_images(TensorSpec("image", "float32", (4, 16, 20), range=(0.0, 1.0)))
    assert not takes_images(TensorSpec("x", "float32", (16, 20), range=(0.0, 1.0)))


def test_json_base64_and_binary_files_give_pillow_s_bilinear_pixels_scaled_to_the_range():
    images = [photo(seed=0), photo((7, 5), "RGB", seed=1)]
    files = [encode(images[0]), encode(images[1], "JPEG", quality=90)]
    want = []
    for file in files:  # what a client gets decoding the file with Pillow the documented way
        pixels = np.asarray(Image.open(io.BytesIO(file)).convert("RGB").resize((20, 16), Image.Resampling.BILINEAR))
        want.append(pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255))
    got = rows(as_json(files))
    assert got.shape == (2, 3, 16, 20) and got.dtype == np.float32
    assert np.array_equal(got, np.stack(want))
    entry, data = as_binary(files)
    assert np.array_equal(rows(entry, binary=data), got)
    # The alpha channel is dropped, not composited: a fully transparent image keeps its colours.
    clear = photo(seed=2)
    clear.putalpha(0)
    assert np.array_equal(rows(as_json([encode(clear)])), rows(as_json([encode(clear.convert("RGB"))])))


def test_grey_is_luma_the_range_is_mapped_linearly_and_the_exif_orientation_applied():
    red = Image.new("RGB", (20, 40), (255, 0, 0))
    got = rows(as_json([encode(red)]), GREY)
    assert np.allclose(got, -1 + 2 * 76 / 255)  # ITU-R 601-2: 0.299 * 255 = 76.2; [0, 255] -> [-1, 1]
    # 40 wide, 20 high, left half white; EXIF orientation 6 says "rotate 90 degrees clockwise to show": the
    # left half becomes the top, and the image is 20 wide, 40 high, the input's own size (no resize).
    wide = Image.new("L", (40, 20), 0)
    wide.paste(255, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    got = rows(as_json([encode(wide, "JPEG", quality=100, exif=exif)]), GREY)[0, 0]
    assert (got[:18] > 0.9).all() and (got[22:] < -0.9).all()


def bomb(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header says width x height: decoding it would inflate without end."""
    png = bytearray(encode(Image.new("L", (1, 1))))
    png[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, then its CRC over type + data
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_a_decompression_bomb_or_huge_image_is_refused_from_its_header():
    start = time.monotonic()
    for width, height in ((100_000, 100_000), (10_000, MAX_PIXELS // 10_000 + 1)):
        e = refusal(as_json([bomb(width, height)]))
        assert e.status == 413 and "than the 40 million an image may have" in str(e), e
    assert "is 10000x4001 pixels" in str(e)
    assert time.monotonic() - start < 1  # never decoded


BAD_FILES = {
    "not an image": (b"hello, world", "not a PNG or JPEG file"),
    "a GIF": (encode(photo(mode="RGB"), "GIF"), "not a PNG or JPEG file"),
    "a cut PNG": (encode(photo())[:200], "cannot be decoded"),
    "a cut JPEG": (encode(photo(mode="RGB"), "JPEG")[:300], "cannot be decoded"),
    "16 bits": (encode(Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))), "send 8 bits per channel"),
    "empty": (b"", "not a PNG or JPEG file"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_file_that_is_not_an_8_bit_png_or_jpeg_is_a_400_that_says_which(name):
    file, message = BAD_FILES[name]
    good = encode(photo())
    e = refusal(as_json([good, file]))
    assert e.status == 400 and str(e).startswith("inputs[0] (image).data[1]: ") and message in str(e), e
    entry, data = as_binary([good, file])
    assert str(refusal(entry, binary=data)) == str(e)


BAD_REQUESTS = {
    "no content_type in JSON": ({**as_json([b"x"]), "parameters": {}}, "add \"parameters\": {\"content_type\""),
    "another content_type": (as_json([b"x"], content_type="hex"), "the only one an image input takes"),
    "not base64": ({**as_json([b"x"]), "data": ["not base64!"]}, "is not base64 text"),
    "a number": ({**as_json([b"x"]), "data": [3]}, "send a file's base64 text"),
    "two files a row": ({**as_json([b"x", b"y"]), "shape": [1, 2]}, "images are one file a row"),
    "fewer files than rows": ({**as_json([b"x"]), "shape": [2]}, "has 1 elements; shape [2] needs 2"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_request_that_does_not_carry_files_as_the_protocol_says_is_a_400(name):
    entry, message = BAD_REQUESTS[name]
    e = refusal(entry)
    assert e.status == 400 and message in str(e), e


def test_more_images_than_the_binary_ceiling_holds_as_rows_are_413_before_any_is_decoded():
    spec = TensorSpec("image", "float32", (3, 224, 224), range=(0.0, 1.0))
    most = BINARY_CEILING // (3 * 224 * 224 * 4)
    e = refusal({**as_json([b"x"] * (most + 1))}, spec)
    assert e.status == 413 and f"{most} images a request" in str(e), e
    assert "not a PNG" in str(refusal({**as_json([b"x"] * most)}, spec))  # at the limit: read, and decoded


def test_an_image_input_without_a_range_takes_floats_only():
    e = refusal(as_json([encode(photo())]), TensorSpec("image", "float32", (3, 16, 20)))
    assert e.status == 400 and "datatype is \"BYTES\"; send FP32" in str(e), e
    assert "FP32 or BYTES images (PNG, JPEG)" in str(refusal({**as_json([b""]), "datatype": "INT64"}))
