"""Encoded images (PNG, JPEG) for any image input: decoded, converted, resized and scaled as the contract says.

An input takes encoded images when its contract entry is float32 of shape [batch, C, H, W] with C 1 (grey)
or 3 (RGB) and a `range` (the values its pixels span in the graph, e.g. [0, 1]): without a range the server
could not know how 0..255 maps onto the model's units, so such an input takes FP32 only. Each file becomes
one row, in this order:

1. decoded by Pillow, PNG or JPEG only; the EXIF orientation applied (a phone's photo comes out upright);
2. converted to the contract's channels: Pillow's "L" (ITU-R 601-2 luma) for 1, "RGB" for 3; alpha dropped,
   not composited; 16-bit and float images refused rather than clipped;
3. resized to H x W with Pillow's bilinear filter in that mode (8-bit per channel), which averages
   over every source pixel a target pixel covers when it shrinks (the page at /ui previews with the same);
4. scaled linearly from 0..255 to the range: low + (high - low) * p / 255, in float32.

An image of more than MAX_PIXELS pixels is refused from its header, before any pixel is decoded, so a small
file that would inflate to gigabytes (a decompression bomb) costs nothing.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from serve.contract import TensorSpec

FORMATS = ("PNG", "JPEG")
# 40 megapixels: a 7000x5700 photo; decoded as RGB, 120 MB, which the server frees before the next file.
MAX_PIXELS = 40_000_000
# 8-bit modes Pillow reads PNG and JPEG files into; "I;16", "I" and "F" would be clipped to 255 by convert.
EIGHT_BIT = {"1": "L", "L": "L", "LA": "L", "P": "RGB", "PA": "RGB", "RGB": "RGB", "RGBA": "RGB", "CMYK": "RGB",
             "YCbCr": "RGB"}
MODES = {1: "L", 3: "RGB"}
RESIZE = Image.Resampling.BILINEAR


class ImageError(ValueError):
    """A file that cannot be a row of the input; `status` 400 (not an image, or not one this takes) or 413."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def takes_images(spec: TensorSpec) -> bool:
    """Whether an input takes encoded images (see the module docstring)."""
    shape = spec.sample_shape
    return (spec.dtype == "float32" and len(shape) == 3 and shape[0] in MODES and not spec.variable
            and spec.range is not None)


def image_parameters(spec: TensorSpec) -> dict[str, str]:
    """What an image input's metadata says about the encoded images it takes."""
    channels, height, width = spec.sample_shape
    return {"encoded_image": "png,jpeg", "image_mode": MODES[channels], "image_size": f"{width}x{height}",
            "image_resize": "bilinear", "image_range": f"{spec.range[0]:g},{spec.range[1]:g}"}


def decode(data: bytes, spec: TensorSpec) -> np.ndarray:
    """One file as a (C, H, W) float32 row of `spec` (an input for which `takes_images`)."""
    channels, height, width = spec.sample_shape
    pixels = pixels_of(data, MODES[channels], (width, height))  # (H, W) or (H, W, 3) uint8
    low, high = spec.range
    scaled = np.float32(low) + np.float32(high - low) * (pixels.astype(np.float32) / np.float32(255))
    return scaled.reshape(height, width, channels).transpose(2, 0, 1)


def pixels_of(data: bytes, mode: str, size: tuple[int, int]) -> np.ndarray:
    """A PNG or JPEG file as uint8 pixels in `mode` ("L" or "RGB") at `size` (width, height)."""
    try:
        with warnings.catch_warnings():
            # Pillow warns of large images and of palette transparency; the first is checked below, the second
            # is alpha, which is dropped anyway.
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageError(413, f"the image is {width}x{height} pixels, more than the "
                                          f"{MAX_PIXELS // 1_000_000} million an image may have")
                if image.mode not in EIGHT_BIT:
                    raise ImageError(400, f"the {image.format} has mode {image.mode}; send 8 bits per channel")
                image = ImageOps.exif_transpose(image)
                for step in (EIGHT_BIT[image.mode], mode):  # e.g. RGBA -> RGB -> L
                    if image.mode != step:
                        image = image.convert(step)
                if image.size != size:
                    image = image.resize(size, RESIZE)
                return np.asarray(image, dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own check, at open, for sizes far beyond ours
        raise ImageError(413, f"the image has more pixels than the {MAX_PIXELS // 1_000_000} million an image "
                              f"may have") from None
    except Image.UnidentifiedImageError:
        raise ImageError(400, "not a PNG or JPEG file") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, zlib errors... on broken files
        message = " ".join(str(e).split())[:120] or type(e).__name__
        raise ImageError(400, f"the file cannot be decoded: {message}") from None
