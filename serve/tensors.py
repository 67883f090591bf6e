"""The tensors of an Open Inference Protocol request and answer: JSON data, or Triton's binary tensor data
extension, in every datatype a contract takes (FP32, INT64, BOOL, and BYTES text for a tokenized input).

Binary requests (what `tritonclient` sends by default): the body is a JSON header of
`Inference-Header-Content-Length` bytes, then each input that says `"parameters": {"binary_data_size": n}`
has its n raw bytes, in the order of the inputs (little-endian; BOOL one byte each; BYTES each element a
4-byte little-endian length and then its bytes). Answers are binary for an output that asks
(`"parameters": {"binary_data": true}`), or for all when the request says `"binary_data_output": true`.

Every value is checked against the contract before the model sees it: the datatype, the shape (sizes that
vary between 1 and their max_length, the same for inputs that share the size's name), integers in an INT64
input and in its range, booleans in a BOOL one, finite floats. A tokenized input also takes text (BYTES):
the server tokenizes it with the vocabulary the contract carries, pads it, and makes the padding masks the
model takes from the same tokenization; a request that sends ids may leave the masks out too, and gets them
from the ids' trailing padding, as training made them. An image input also takes PNG and JPEG files (BYTES,
one file a row; `serve.images` says which inputs and how they are decoded): as binary data, each element
the file's bytes, or in JSON as base64 text with `"parameters": {"content_type": "base64"}` (JSON strings
are text, and a file is not).
"""

import base64
import binascii
import json
import struct
from itertools import chain

import numpy as np

from serve.contract import FLOAT32_MAX, TensorSpec
from serve.images import ImageError, decode, takes_images
from serve.limits import BINARY_CEILING, MAX_ROWS
from t2d.text import TextError

HEADER_LENGTH = "inference-header-content-length"
ELEMENT_BYTES = {"FP32": 4, "INT64": 8, "BOOL": 1}
NUMPY = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8"), "BOOL": np.dtype(np.bool_)}
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
INPUT_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})


class V2Error(Exception):
    """A request this server cannot answer: `status` (4xx, 503, or 500 when a model fails on valid input) and a
    one-line message that says what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def split_body(raw: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON part of a body and the binary data after it (empty without the extension's header)."""
    if header_length is None:
        return raw, memoryview(b"")
    if not header_length.strip().isdigit() or int(header_length) > len(raw):
        raise V2Error(400, f"Inference-Header-Content-Length is {header_length!r}; it must be the byte length of the "
                           f"JSON header at the start of the body ({len(raw)} bytes)")
    n = int(header_length)
    return raw[:n], memoryview(raw)[n:]


def show(value) -> str:
    """A client's value in an error message: JSON, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Binary:
    """The binary data after the JSON header, handed out in order to the inputs that say how much they take."""

    def __init__(self, data: memoryview):
        self.data, self.offset = data, 0

    def take(self, n: int, where: str) -> memoryview:
        if self.offset + n > len(self.data):
            raise V2Error(400, f"{where}.parameters.binary_data_size is {n}, but only {len(self.data) - self.offset} "
                               f"bytes of binary data are left in the body")
        chunk = self.data[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise V2Error(400, f"the body has {len(self.data) - self.offset} bytes of binary data that no input's "
                               f"binary_data_size accounts for")


def parse_inputs(entries, specs: tuple[TensorSpec, ...], binary: memoryview,
                 check_parameters) -> tuple[dict[str, np.ndarray], int]:
    """The feeds for onnxruntime, one per contract input, and the number of rows."""
    expected = ", ".join(f"{s.name} ({_accepts(s)} [n, {', '.join(map(str, s.sample_shape))}])" for s in specs)
    if type(entries) is not list or not entries:
        raise V2Error(400, f"inputs must be a non-empty list; this model takes {expected}")
    by_name = {s.name: s for s in specs}
    data = Binary(binary)
    feeds: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[int, str]] = {}  # a varying size's name -> (its size in this request, the input that set it)
    lengths: dict[str, np.ndarray] = {}  # each row's size, where text was tokenized: for the padding masks
    rows = None
    for i, entry in enumerate(entries):
        where = f"inputs[{i}]"
        if type(entry) is not dict:
            raise V2Error(400, f"{where} must be an object with name, shape, datatype and data")
        binary_size = _binary_size(entry, where, check_parameters)
        missing = {"name", "shape", "datatype"} - entry.keys() | ({"data"} - entry.keys() if binary_size is None
                                                                  else set())
        unknown = entry.keys() - INPUT_KEYS
        if missing or unknown:
            raise V2Error(400, f"{where} " + (f"lacks {', '.join(sorted(missing))}" if missing else
                                              f"has unknown key(s) {sorted(unknown)}") +
                          f"; it takes {', '.join(sorted(INPUT_KEYS))}")
        spec = by_name.get(entry["name"]) if type(entry["name"]) is str else None
        if spec is None:
            raise V2Error(400, f"{where}.name is {show(entry['name'])}; this model takes {expected}")
        if spec.name in feeds:
            raise V2Error(400, f"input {spec.name!r} is given twice; send each input once")
        if binary_size is not None and "data" in entry:
            raise V2Error(400, f"{where} has both data and binary_data_size; send one")
        raw = data.take(binary_size, where) if binary_size is not None else None
        where = f"{where} ({spec.name})"
        if entry["datatype"] == "BYTES" and spec.tokenizer is not None:
            x, lengths[spec.name] = text_array(entry, spec, raw, where)
        elif entry["datatype"] == "BYTES" and takes_images(spec):
            x = image_array(entry, spec, raw, where)
        else:
            x = input_array(entry, spec, raw, where)
        if rows is not None and len(x) != rows:
            raise V2Error(400, f"{where} has {len(x)} rows and an earlier input {rows}; send the same rows for every "
                               f"input")
        rows = len(x)
        for axis, d in enumerate(spec.sample_shape):
            if isinstance(d, str):
                size = x.shape[axis + 1]
                if d in sizes and sizes[d][0] != size:
                    raise V2Error(400, f"{where} has {d} {size} and input {sizes[d][1]!r} {sizes[d][0]}; inputs that "
                                       f"share the size {d!r} must have the same")
                sizes.setdefault(d, (size, spec.name))
        feeds[spec.name] = x
    data.finish()
    for spec in specs:  # padding masks left out: made as training made them
        if spec.name not in feeds and spec.padding_mask_of in feeds:
            source = by_name[spec.padding_mask_of]
            feeds[spec.name] = padding_mask(feeds[source.name], source, lengths.get(source.name))
    if len(feeds) != len(specs):
        missing = [s.name for s in specs if s.name not in feeds]
        raise V2Error(400, f"missing input(s) {missing}; this model takes {expected}")
    return feeds, rows


def _accepts(spec: TensorSpec) -> str:
    if spec.tokenizer is not None:
        return f"{spec.datatype} or BYTES text"
    return f"{spec.datatype} or BYTES images (PNG, JPEG)" if takes_images(spec) else spec.datatype


def _binary_size(entry: dict, where: str, check_parameters) -> int | None:
    parameters = entry.get("parameters")
    if parameters is None:
        return None
    check_parameters(parameters, f"{where}.parameters")
    size = parameters.get("binary_data_size")
    if size is None or size is False:  # false: a JSON body's way of saying it carries no binary data
        return None
    if type(size) is not int or size < 0:
        raise V2Error(400, f"{where}.parameters.binary_data_size must be a byte count, got {show(size)}")
    return size


def _shape(entry: dict, spec: TensorSpec, where: str) -> list[int]:
    shape = entry["shape"]
    sample = [f"1..{spec.max_length}" if isinstance(d, str) else d for d in spec.sample_shape]
    wanted = f"[n, {', '.join(map(str, sample))}] with 1 <= n <= {MAX_ROWS}"
    ok = (type(shape) is list and all(type(d) is int for d in shape) and len(shape) == 1 + len(sample)
          and 1 <= shape[0] <= MAX_ROWS and all(
              (1 <= got <= spec.max_length) if isinstance(want, str) else got == want
              for got, want in zip(shape[1:], spec.sample_shape)))
    if not ok:
        too_long = (type(shape) is list and len(shape) == 1 + len(sample) and all(type(d) is int for d in shape)
                    and any(isinstance(w, str) and g > spec.max_length for g, w in zip(shape[1:], spec.sample_shape)))
        if too_long:
            raise V2Error(400, f"{where}.shape is {show(shape)}: longer than the model takes (at most "
                               f"{spec.max_length}); send {wanted}")
        raise V2Error(400, f"{where}.shape is {show(shape)}; send {wanted}")
    return shape


def input_array(entry: dict, spec: TensorSpec, raw: memoryview | None, where: str) -> np.ndarray:
    """One input's data as an array of the contract's shape and dtype, after checking every value."""
    datatype = entry["datatype"]
    if datatype != spec.datatype:
        raise V2Error(400, f"{where}.datatype is {show(datatype)}; send {_accepts(spec)}")
    shape = _shape(entry, spec, where)
    count = int(np.prod(shape))
    if raw is not None:
        if len(raw) != count * ELEMENT_BYTES[datatype]:
            raise V2Error(400, f"{where} has {len(raw)} bytes of binary data; shape {shape} of {datatype} needs "
                               f"{count * ELEMENT_BYTES[datatype]}")
        x = np.frombuffer(raw, dtype=NUMPY[datatype]).reshape(shape)
        if datatype == "BOOL" and not np.isin(np.frombuffer(raw, dtype=np.uint8), (0, 1)).all():
            raise V2Error(400, f"{where} holds bytes other than 0 and 1; BOOL data is one byte, 0 or 1, each")
        return _checked(x.astype(spec.np_dtype), spec, where, None)
    flat = _flat(entry["data"], len(shape), where)
    if len(flat) != count:
        raise V2Error(400, f"{where}.data has {len(flat)} values; shape {shape} needs {count}")
    types = set(map(type, flat))
    if datatype == "BOOL":
        if types - {bool}:
            bad = next(v for v in flat if type(v) is not bool)
            raise V2Error(400, f"{where}.data holds {show(bad)}; send true or false")
        return np.array(flat, dtype=np.bool_).reshape(shape)
    if datatype == "INT64":
        if types - {int}:
            bad = next(v for v in flat if type(v) is not int)
            raise V2Error(400, f"{where}.data holds {show(bad)}; an INT64 input takes integers")
        if min(flat) < INT64_MIN or max(flat) > INT64_MAX:
            raise V2Error(400, f"{where}.data holds an integer beyond int64")
        return _checked(np.array(flat, dtype=np.int64).reshape(shape), spec, where, flat)
    if not types <= {float, int}:  # bool, str, None, a list or an object
        bad = next(v for v in flat if type(v) not in (float, int))
        raise V2Error(400, f"{where}.data holds {show(bad)}; send numbers")
    try:
        x = np.array(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond float64
        raise V2Error(400, f"{where}.data holds an integer beyond float32 (|x| <= 3.4e38)") from None
    return _checked(x, spec, where, flat).astype(spec.np_dtype).reshape(shape)


def _flat(data, depth: int, where: str) -> list:
    if type(data) is not list:
        raise V2Error(400, f"{where}.data must be a list (flat, row-major), got {show(data)}")
    flat = data
    for _ in range(depth - 1):  # nested lists, as the protocol allows: flatten level by level
        if not flat or type(flat[0]) is not list:
            break
        if not all(type(v) is list for v in flat):
            raise V2Error(400, f"{where}.data mixes lists and numbers at one level; send it flat, or nested as its "
                               f"shape")
        flat = list(chain.from_iterable(flat))
    return flat


def _checked(x: np.ndarray, spec: TensorSpec, where: str, flat: list | None) -> np.ndarray:
    """`x` (float64 or int64 from JSON, or the contract's dtype from binary data) within float32 and the range."""
    if spec.dtype == "float32" and x.size:
        finite = np.isfinite(x)
        if not finite.all() or not np.abs(x).max() <= FLOAT32_MAX:  # 1e400 parses as inf
            bad = x.ravel()[np.flatnonzero(~finite.ravel() | (np.abs(x.ravel()) > FLOAT32_MAX))[0]]
            raise V2Error(400, f"{where}.data holds {bad:g}, beyond float32 (|x| <= 3.4e38): send finite numbers")
    if spec.range is not None and x.size and spec.dtype != "bool":
        low, high = spec.range
        if x.min() < low or x.max() > high:
            i = int(np.flatnonzero((x.ravel() < low) | (x.ravel() > high))[0])
            value = flat[i] if flat is not None else x.ravel()[i].item()
            raise V2Error(400, f"{where}.data[{i}] is {value}, outside the valid range [{low:g}, {high:g}]")
    return x


def _one_per_row(entry: dict, where: str, what: str) -> int:
    """The rows of a BYTES input that holds one element a row (shape [n] or [n, 1])."""
    shape = entry["shape"]
    if not (type(shape) is list and all(type(d) is int for d in shape) and shape[1:] in ([], [1])
            and shape and 1 <= shape[0] <= MAX_ROWS):
        raise V2Error(400, f"{where}.shape is {show(shape)}; {what}: send [n] or [n, 1] with 1 <= n <= {MAX_ROWS}")
    return shape[0]


def image_array(entry: dict, spec: TensorSpec, raw: memoryview | None, where: str) -> np.ndarray:
    """PNG or JPEG files for an image input (BYTES, one file a row): the rows the model takes (`serve.images`)."""
    n = _one_per_row(entry, where, "images are one file a row")
    row_bytes = spec.size * 4
    if n * row_bytes > BINARY_CEILING:  # what n rows of float32 would take as binary data: the same ceiling
        raise V2Error(413, f"{where} has {n} images, {n * row_bytes} bytes as the model's float32 rows; the limit is "
                           f"{BINARY_CEILING} bytes, {BINARY_CEILING // row_bytes} images a request")
    content_type = (entry.get("parameters") or {}).get("content_type")
    if content_type not in (None, "base64"):
        raise V2Error(400, f"{where}.parameters.content_type is {show(content_type)}; the only one an image input "
                           f"takes is \"base64\" (or none, for binary data)")
    if raw is not None:
        files = [bytes(f) for f in _elements(raw, n, where)]
    elif content_type != "base64":
        raise V2Error(400, f"{where} holds images in JSON, which takes them as base64 text only: add \"parameters\": "
                           f"{{\"content_type\": \"base64\"}}, or send the files as binary data")
    else:
        files = _flat(entry["data"], len(entry["shape"]), where)
        if len(files) != n:
            raise V2Error(400, f"{where}.data has {len(files)} elements; shape {entry['shape']} needs {n}")
    rows = []
    for k, file in enumerate(files):
        if content_type == "base64":
            if type(file) not in (str, bytes):
                raise V2Error(400, f"{where}.data[{k}] is {show(file)}; send a file's base64 text")
            try:
                file = base64.b64decode(file, validate=True)
            except (binascii.Error, ValueError):
                raise V2Error(400, f"{where}.data[{k}] is not base64 text (A-Z, a-z, 0-9, +, /, = padding)") from None
        try:
            rows.append(decode(file, spec))
        except ImageError as e:
            raise V2Error(e.status, f"{where}.data[{k}]: {e}") from None
    return np.stack(rows)


def text_array(entry: dict, spec: TensorSpec, raw: memoryview | None, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Text for a tokenized input (BYTES, one string per row, shape [n] or [n, 1]): its ids, padded to the longest,
    and each row's number of tokens."""
    n = _one_per_row(entry, where, "text is one string a row")
    shape = entry["shape"]
    texts = _strings(raw, n, where) if raw is not None else _flat(entry["data"], len(shape), where)
    if len(texts) != shape[0]:
        raise V2Error(400, f"{where}.data has {len(texts)} strings; shape {shape} needs {shape[0]}")
    ids = []
    for k, text in enumerate(texts):
        if type(text) is not str:
            raise V2Error(400, f"{where}.data[{k}] is {show(text)}; BYTES data are strings")
        try:
            ids.append(spec.tokenizer.encode(text, spec.max_length))
        except TextError as e:
            raise V2Error(400, f"{where}.data[{k}] ({show(text)}): {e}") from None
    lengths = np.array([len(t) for t in ids])
    x = np.full((len(ids), int(lengths.max())), spec.pad, dtype=np.int64)
    for row, t in zip(x, ids):
        row[:len(t)] = t
    return x, lengths


def _elements(raw: memoryview, n: int, where: str) -> list[memoryview]:
    """n BYTES elements of binary data: each a 4-byte little-endian length, then that many bytes."""
    out, offset = [], 0
    for k in range(n):
        if offset + 4 > len(raw):
            raise V2Error(400, f"{where}'s binary data ends before element {k}'s 4-byte length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise V2Error(400, f"{where}'s binary element {k} says {size} bytes; {len(raw) - offset} are left")
        out.append(raw[offset:offset + size])
        offset += size
    if offset != len(raw):
        raise V2Error(400, f"{where} has {len(raw) - offset} bytes of binary data after its {n} elements")
    return out


def _strings(raw: memoryview, n: int, where: str) -> list[str]:
    """n BYTES elements of binary data, each UTF-8 text."""
    out = []
    for k, element in enumerate(_elements(raw, n, where)):
        try:
            out.append(bytes(element).decode("utf-8"))
        except UnicodeDecodeError:
            raise V2Error(400, f"{where}'s binary element {k} is not UTF-8 text") from None
    return out


def padding_mask(ids: np.ndarray, source: TensorSpec, lengths: np.ndarray | None) -> np.ndarray:
    """True past each row's size along every varying axis of `source`: the tokenized lengths where text was sent,
    else each row up to its last value that is not the input's padding (as training sizes a padded tensor)."""
    mask = np.zeros(ids.shape, dtype=np.bool_)
    for axis, d in enumerate(source.sample_shape, start=1):
        if not isinstance(d, str):
            continue
        if lengths is not None:
            n = lengths
        else:
            others = tuple(a for a in range(1, ids.ndim) if a != axis)
            real = (ids != source.pad).any(axis=others) if others else ids != source.pad  # (rows, size)
            n = np.where(real.any(1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 1)
        positions = np.arange(ids.shape[axis]).reshape([-1 if a == axis else 1 for a in range(ids.ndim)])
        mask |= positions >= np.asarray(n).reshape([-1] + [1] * (ids.ndim - 1))
    return mask


def encode_output(spec: TensorSpec, out: np.ndarray, binary: bool) -> tuple[dict, bytes]:
    """One output's answer entry, with its data inline (JSON) or as binary data to append after the header."""
    entry = {"name": spec.name, "datatype": spec.datatype, "shape": list(out.shape)}
    if not binary:
        return {**entry, "data": out.ravel().tolist()}, b""
    data = np.ascontiguousarray(out, dtype=NUMPY[spec.datatype]).tobytes()
    return {**entry, "parameters": {"binary_data_size": len(data)}}, data
