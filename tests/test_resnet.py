"""A real-size architecture end to end: torchvision's ResNet-18 at 3x224x224 (tests/resnet_task.py) trained for
two steps, exported with `python -m export`, served by a real `bentoml serve`, and asked over /v2 as its users
would: tritonclient with its defaults (16 images as binary FP32, 9.6 MB), JPEG and PNG files as BYTES (binary, as
tritonclient sends them, and base64 in JSON, as docs/serving.md's curl does), and the page at /ui. Every answer is
compared with onnxruntime on the exported file, run on the pixels Pillow decodes from the same file.
"""

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest
from conftest import REPO, train
from PIL import Image
from serving import Server, env_for, softmax
import zygote

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two training steps of 16 images (in this process), then export and registration into ROOT/bentoml."""
    root = tmp_path_factory.mktemp("resnet")
    train(["--task", "resnet_task:RESNET", "--run.max_batches", "2"], root / "run")
    env = {**env_for(root / "bentoml"), "PYTHONPATH": f"{REPO}:{TESTS}"}
    done = zygote.run(["-m", "export", "--task", "resnet_task:RESNET", "--format", "onnx",
                       "--checkpoint", str(root / "run" / "best.pt"), "--out", str(root / "export"),
                       "--batch-sizes", "1,3"], REPO, env, 600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def server(runs):
    srv = Server(runs / "bentoml", runs / "serve.log")
    yield srv.wait_ready()
    srv.stop()


@pytest.fixture(scope="module")
def session(runs) -> ort.InferenceSession:
    return ort.InferenceSession(str(runs / "export" / "model.onnx"), providers=["CPUExecutionProvider"])


def expected(session, files: list[bytes]) -> np.ndarray:
    """onnxruntime's logits for the files as docs/serving.md says the server decodes them, done here with Pillow."""
    rows = []
    for file in files:
        with Image.open(io.BytesIO(file)) as image:
            pixels = np.asarray(image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
        rows.append(pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255))
    return session.run(None, {"image": np.stack(rows)})[0]


def files() -> dict[str, bytes]:
    """A JPEG photo-sized and a small PNG with alpha, neither 224x224, and a PNG at the model's own size."""
    rng = np.random.default_rng(0)
    out = {}
    for name, (w, h, mode, fmt) in {"photo.jpg": (640, 480, "RGB", "JPEG"), "icon.png": (100, 150, "RGBA", "PNG"),
                                    "exact.png": (224, 224, "RGB", "PNG")}.items():
        smooth = np.kron(rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, len(mode))), np.ones((10, 10, 1)))
        buf = io.BytesIO()
        Image.fromarray(smooth[:h, :w].astype(np.uint8), mode).save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


FILES = files()


def test_tritonclient_sends_16_images_as_binary_data_and_gets_onnxruntime_s_logits(server, session):
    import tritonclient.http as httpclient

    x = np.random.default_rng(1).random((16, 3, 224, 224), dtype=np.float32)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=120)
    image = httpclient.InferInput("image", list(x.shape), "FP32")
    image.set_data_from_numpy(x)  # binary: 9.6 MB, beyond the 1 MiB a JSON body may be
    result = client.infer("resnet18", [image])
    np.testing.assert_allclose(result.as_numpy("logits"), session.run(None, {"image": x})[0], rtol=0, atol=1e-5)
    client.close()


def test_jpeg_and_png_files_as_binary_bytes_and_as_base64_json_equal_onnxruntime_on_pillow_s_pixels(server, session):
    import tritonclient.http as httpclient

    want = expected(session, list(FILES.values()))
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    image = httpclient.InferInput("image", [len(FILES)], "BYTES")
    image.set_data_from_numpy(np.array(list(FILES.values()), dtype=np.object_))  # binary: 4-byte lengths, the files
    np.testing.assert_allclose(client.infer("resnet18", [image]).as_numpy("logits"), want, rtol=0, atol=1e-5)
    client.close()
    body = {"inputs": [{"name": "image", "shape": [len(FILES)], "datatype": "BYTES",
                        "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(f).decode() for f in FILES.values()]}]}
    answer = server.expect(server.post("/v2/models/resnet18/infer", body), 200)
    assert answer["outputs"][0]["shape"] == [3, 10]
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(3, 10), want, rtol=0, atol=1e-5)


def test_the_documented_curl_sends_a_jpeg(server, session, tmp_path):
    """docs/serving.md's JPEG curl (and the README's), as written there but for the port."""
    page = (REPO / "docs" / "serving.md").read_text()
    command = next(block for block in re.findall(r"```bash\n(.*?)```", page, re.S) if "cat.jpg" in block)
    assert command in (REPO / "README.md").read_text()  # the README shows the same
    (tmp_path / "cat.jpg").write_bytes(FILES["photo.jpg"])
    shell = shutil.which("bash")
    done = subprocess.run([shell, "-c", command.replace("127.0.0.1:3000", f"127.0.0.1:{server.port}")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    logits = json.loads(done.stdout)["outputs"][0]["data"]
    np.testing.assert_allclose(logits, expected(session, [FILES["photo.jpg"]])[0], rtol=0, atol=1e-5)


def test_metadata_says_the_input_takes_png_and_jpeg_and_fits_the_api_document(server):
    meta = server.expect(server.get("/v2/models/resnet18"), 200)
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 224, 224], "parameters": {
        "encoded_image": "png,jpeg", "image_mode": "RGB", "image_size": "224x224", "image_resize": "bilinear",
        "image_range": "0,1"}}]
    spec = server.expect(server.get("/docs.json"), 200)
    schema = {"$ref": "#/components/schemas/V2ModelMetadata", "components": spec["components"]}
    jsonschema.validate(meta, schema)


def bomb() -> bytes:
    """A 1x1 PNG whose header says 60000x60000: decoding it would take 3.6 GB."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", 60000, 60000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


BAD = {"text": (b"hello", 400), "a cut JPEG": (FILES["photo.jpg"][:500], 400), "a bomb": (bomb(), 413)}


def test_a_bad_file_is_a_4xx_with_one_line_and_the_server_keeps_serving(server, session):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    for name, (file, status) in BAD.items():
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                            "parameters": {"content_type": "base64"}, "data": [base64.b64encode(file).decode()]}]}
        error = server.expect(server.post("/v2/models/resnet18/infer", body), status)["error"]
        assert error.startswith("inputs[0] (image).data[0]: ") and "\n" not in error, (name, error)
        image = httpclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([file], dtype=np.object_))
        with pytest.raises(InferenceServerException) as e:  # the same, sent as binary data
            client.infer("resnet18", [image])
        assert e.value.status() == str(status) and e.value.message() == error, (name, e.value)
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([FILES["exact.png"]], dtype=np.object_))
    np.testing.assert_allclose(client.infer("resnet18", [image]).as_numpy("logits"),
                               expected(session, [FILES["exact.png"]]), rtol=0, atol=1e-5)
    client.close()
    assert server.get("/readyz").status == 200 and "Traceback" not in server.log()


def test_the_page_sends_a_picked_jpeg_and_previews_what_the_model_receives(server, session, tmp_path):
    from playwright.sync_api import sync_playwright

    path = tmp_path / "photo.jpg"
    path.write_bytes(FILES["photo.jpg"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"))
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/ui")
        c = page.locator('.card[data-model="resnet18"]')
        c.locator("input[type=file]").set_input_files(str(path))
        c.locator(".bar").nth(9).wait_for()
        shown = [float(v) for v in c.locator(".bar").evaluate_all("bars => bars.map(b => b.dataset.p)")]
        preview = np.array(c.locator("canvas.seen").evaluate(
            "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)")).reshape(224, 224, 4)
        browser.close()
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(FILES["photo.jpg"]).decode()]}]}
    logits = server.expect(server.post("/v2/models/resnet18/infer", body), 200)["outputs"][0]["data"]
    assert np.allclose(shown, softmax(np.array(logits)), rtol=1e-9, atol=0), (shown, logits)  # the file, unchanged
    with Image.open(path) as image:
        want = np.asarray(image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)).astype(int)
    # Another build of chromium's JPEG decoder may round a pixel apart from Pillow's; the resize is Pillow's own.
    assert np.abs(preview[..., :3] - want).max() <= 1, np.abs(preview[..., :3] - want).max()  # 0 measured here
