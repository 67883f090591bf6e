"""The page for people at /ui, in a real browser: Debian's chromium driven by playwright, against a real
`bentoml serve` on a store that `python -m export` filled (`serving.exported`: product and fashion-mnist)
plus a user's own two tasks trained and exported here (a 6-feature regression and 3 classes of 8x8 images).

Every check compares what the page shows with what the store holds or what the server answers over HTTP
for the same input; and no page the server serves (/ui, the Swagger UI at /) asks another host for anything.
Screenshots of each page are kept under $T2D_TEST_ARTIFACTS (default: a pytest temporary folder); the path
is printed.
"""

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FAST, cli
from PIL import Image
from playwright.sync_api import sync_playwright
from serving import Server, copy_store, export_cli, exported, softmax
from test_task import write_user_tasks

pytestmark = pytest.mark.slow

USER_TASKS = {"REG": "six-features", "IMG": "tiny-images"}
# A name for this machine that is not localhost: pages opened through it behave as in a deployment.
OTHER_NAME = "t2d-server.test"
CLASSIFIERS = {"fashion-mnist": 10, "tiny-images": 3}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A folder whose bentoml/ store holds the two exports and the user's two tasks, each with its plots."""
    home = tmp_path_factory.mktemp("ui")
    copy_store(exported(tmp_path_factory), home / "bentoml")
    module = write_user_tasks(home, prefix="ui_")["tasks"]
    for name in USER_TASKS:
        run = cli([*FAST, "--log.plots", "true", "--task", f"{module}:{name}", "--out", f"runs/{name}"], home)
        assert run.returncode == 0, run.stderr[-3000:]
        export = export_cli(["--task", f"{module}:{name}", "--checkpoint", f"runs/{name}/best.pt"],
                            home / "bentoml", home)
        assert export.returncode == 0, export.stderr[-3000:]
    # The image task's served entry is an int8 variant with one layer pinned in float32 (a loose bound: the card's
    # facts are under test here, the gate in test_quantize.py).
    export = export_cli(["--task", f"{module}:IMG", "--checkpoint", "runs/IMG/best.pt", "--quantize", "int8",
                         "--keep-float", "net.fc", "--max-accuracy-drop", "100"], home / "bentoml", home)
    assert export.returncode == 0, export.stderr[-3000:]
    return home


@pytest.fixture(scope="module")
def server(store):
    srv = Server(store / "bentoml", store / "serve.log")
    yield srv.wait_ready()
    srv.stop()


@pytest.fixture(scope="module")
def entries(store) -> dict[str, dict]:
    """name -> the served (only) entry's model.yaml: tag, metadata."""
    out = {}
    for folder in sorted((store / "bentoml" / "models").iterdir()):
        version = (folder / "latest").read_text().strip()
        info = yaml.safe_load((folder / version / "model.yaml").read_text())
        out[folder.name] = {"tag": f"{folder.name}:{version}", "meta": info["metadata"]}
    assert set(out) == {"product", "fashion-mnist", *USER_TASKS.values()}
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("T2D_TEST_ARTIFACTS") or tmp_path_factory.mktemp("ui-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of /ui: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    assert chromium, "no chromium on PATH: apt-get install chromium (.ci/run does)"
    with sync_playwright() as p:
        # OTHER_NAME resolves to this machine, as a deployment's own host name would (see test_no_page_asks_...).
        b = p.chromium.launch(executable_path=chromium, args=[f"--host-resolver-rules=MAP {OTHER_NAME} 127.0.0.1"])
        yield b
        b.close()


def open_ui(browser, server, **context):
    """A fresh page on /ui once every card is drawn; the URLs it asked for are in page.requested."""
    page = browser.new_context(**{"viewport": {"width": 1200, "height": 900}, **context}).new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.requested = requested
    page.goto(f"http://127.0.0.1:{server.port}/ui")
    page.wait_for_function("document.querySelectorAll('.card').length === 4")
    return page


def card(page, name: str):
    return page.locator(f'.card[data-model="{name}"]')


def close_to(shown: str, value: float, digits: int) -> bool:
    """`shown` is `value` rounded to `digits` significant digits."""
    return abs(float(shown) - value) <= 0.51 * 10 ** (np.floor(np.log10(abs(value))) - digits + 1) if value else \
        float(shown) == 0


# --- the cards ---------------------------------------------------------------------------------------

def test_a_quantized_card_says_which_layers_stayed_float_and_why(browser, server, entries):
    meta = entries["tiny-images"]["meta"]
    q = meta["quantization"]
    assert meta["variant"] == "int8" and q["kept_float"][0]["module"] == "net.fc"
    page = open_ui(browser, server)
    box = card(page, "tiny-images").locator(".quantization")
    assert box.is_visible()
    note = box.locator(".quant-note").inner_text()
    assert note.startswith("int8, static portable: test accuracy") and q["cpu"]["model"] in note
    assert box.locator("li[data-layer='net.fc']").inner_text() == "net.fc (Gemm) stays float32: --keep-float"
    assert not card(page, "product").locator(".quantization").is_visible()  # a float model has no such section


def test_each_card_shows_what_the_model_store_holds(browser, server, entries, artifacts):
    page = open_ui(browser, server)
    page.wait_for_function("[...document.images].every(i => i.complete)")
    for name, entry in entries.items():
        c, meta = card(page, name), entry["meta"]
        assert c.locator("[data-field=tag]").inner_text() == entry["tag"]
        assert c.locator("[data-field=sha256]").inner_text() == meta["checkpoint_sha256"][:16] + "…"
        assert c.locator("[data-field=parameters]").inner_text() == f"{meta['parameters']:,}"
        seconds = c.locator("[data-field=train_seconds]").inner_text()
        assert seconds.endswith(" s") and close_to(seconds[:-2], meta["train_seconds"], 3), seconds
        for fmt, worst in meta["parity"]["worst"].items():
            shown = c.locator(f"tr[data-format={fmt}] .max-abs").inner_text()
            assert close_to(shown, worst["max_abs_err"], 3), (name, fmt, shown, worst)
        metric = "accuracy" if name in CLASSIFIERS else "mse"
        shown = c.locator(f"tr[data-metric={metric}] .test").inner_text()
        assert close_to(shown, meta["test_metrics"][metric], 4), (name, metric, shown)
        # The training pictures, copied into the entry by export and sent by the server.
        assert meta["plots"] and "loss.png" in meta["plots"]
        widths = c.locator(".plots img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
        assert len(widths) == len(meta["plots"]) and min(widths) > 0, (name, widths)
    # Offline: nothing but this server is asked for anything.
    assert all(url.startswith(f"http://127.0.0.1:{server.port}/") for url in page.requested), page.requested
    page.screenshot(path=artifacts / "ui-cards.png", full_page=True)


# --- trying the models ---------------------------------------------------------------------------------

def shown_bars(c) -> list[float]:
    return [float(p) for p in c.locator(".bar").evaluate_all("bars => bars.map(b => b.dataset.p)")]


def seen(c) -> np.ndarray:
    """What the model received: the small canvas's pixels 0..255, as the page sent them (grey: the red channel)."""
    return np.array(c.locator("canvas.seen").evaluate(
        "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data).filter((_, i) => i % 4 === 0)"))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_a_drawing_gets_the_answer_v2_gives_for_the_input_the_page_shows(browser, server, entries, artifacts, name):
    page = open_ui(browser, server)
    c = card(page, name)
    pad = c.locator("canvas.pad")
    pad.scroll_into_view_if_needed()
    box = pad.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    for t in np.linspace(0, 1, 12):  # a diagonal stroke
        page.mouse.move(box["x"] + box["width"] * (0.3 + 0.4 * t), box["y"] + box["height"] * (0.2 + 0.6 * t))
    page.mouse.up()
    c.locator(".bar").nth(CLASSIFIERS[name] - 1).wait_for()
    pixels = seen(c)
    spec = entries[name]["meta"]["contract"]["inputs"][0]
    h, w = spec["shape"][2:]
    assert pixels.size == h * w and pixels.max() > 0, "the stroke did not reach the downscaled input"
    x = (pixels / 255).astype(np.float32).reshape(1, 1, h, w)
    body = {"inputs": [{"name": spec["name"], "shape": [1, 1, h, w], "datatype": "FP32", "data": x.ravel().tolist()}]}
    logits = np.array(server.expect(server.post(f"/v2/models/{name}/infer", body), 200)["outputs"][0]["data"])
    p = softmax(logits)
    assert np.allclose(shown_bars(c), p, atol=1e-6), (shown_bars(c), p)
    classes = entries[name]["meta"]["contract"]["classes"]
    assert c.locator("[data-field=label]").inner_text() == f"{p.argmax()}: {classes[p.argmax()]}"
    page.screenshot(path=artifacts / f"ui-pad-{name}.png", full_page=True)

    c.locator("button", has_text="Clear").click()
    assert c.locator(".bar").count() == 0


def pillow_pixels(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """The file's pixels as the server decodes them (serve/images.py), by Pillow directly."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").convert(mode).resize(size, Image.Resampling.BILINEAR))


def test_a_picked_file_is_previewed_as_the_server_decodes_it_and_gets_v2_s_answer_for_it(browser, server, tmp_path):
    page = open_ui(browser, server)
    c = card(page, "fashion-mnist")
    rng = np.random.default_rng(3)
    colour = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)  # 50 wide, 37 high: shrunk to 28x28, unevenly
    colour[5:30, 20:30] = 250
    path = tmp_path / "item.png"
    Image.fromarray(colour, "RGB").save(path)
    c.locator("input[type=file]").set_input_files(str(path))
    c.locator(".bar").nth(9).wait_for()
    assert np.array_equal(seen(c).reshape(28, 28), pillow_pixels(path, "L", (28, 28)))
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(path.read_bytes()).decode()]}]}
    logits = np.array(server.expect(server.post("/v2/models/fashion-mnist/infer", body), 200)["outputs"][0]["data"])
    assert np.allclose(shown_bars(c), softmax(logits), atol=1e-9)

    path.write_bytes(b"not an image")  # the server's 400, as it says it
    c.locator("input[type=file]").set_input_files(str(path))
    error = c.locator("[data-field=server-error]")
    error.wait_for()
    body["inputs"][0]["data"] = [base64.b64encode(path.read_bytes()).decode()]
    reply = server.post("/v2/models/fashion-mnist/infer", body)
    assert reply.status == 400 and error.inner_text() == f"400: {reply.json['error']}"


def test_the_product_form_answers_and_shows_the_servers_errors(browser, server):
    page = open_ui(browser, server)
    c = card(page, "product")

    def submit(x1: str, x2: str):
        c.locator("input[name=x1]").fill(x1)
        c.locator("input[name=x2]").fill(x2)
        c.locator(".result").evaluate("r => r.replaceChildren()")
        c.locator("button", has_text="Predict").click()
        c.locator(".result > *").first.wait_for()

    submit("3", "4")
    want = server.expect(server.post("/predict", {"x1": 3, "x2": 4}), 200)
    assert close_to(c.locator("[data-field=y]").inner_text(), want["y"], 6)
    assert not want["extrapolated"] and c.locator("[data-field=extrapolated]").count() == 0
    submit("12", "4")
    assert server.expect(server.post("/predict", {"x1": 12, "x2": 4}), 200)["extrapolated"]
    assert "extrapolation" in c.locator("[data-field=extrapolated]").inner_text()

    for x1, sent in (("", None), ("1e39", 1e39)):  # empty: sent as null; 1e39: beyond float32
        submit(x1, "4")
        reply = server.post("/predict", {"x1": sent, "x2": 4})
        assert reply.status == 400
        shown = c.locator("[data-field=server-error]").inner_text()
        assert shown.startswith(f"400: {reply.json['error']}")
        for problem in reply.json["detail"]:
            assert problem["msg"] in shown, (shown, problem)


def test_a_users_task_gets_a_form_from_its_contract(browser, server):
    page = open_ui(browser, server)
    c = card(page, "six-features")
    fields = c.locator("input[type=number]")
    assert fields.count() == 6
    x = [0.5, -1.0, 2.0, 0.0, 3.25, 1.0]
    for i, v in enumerate(x):
        fields.nth(i).fill(str(v))
    c.locator("button", has_text="Infer").click()
    c.locator("[data-field=output]").wait_for()
    body = {"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32", "data": x}]}
    want = server.expect(server.post("/v2/models/six-features/infer", body), 200)["outputs"][0]["data"][0]
    assert close_to(c.locator("[data-field=output]").inner_text(), want, 6)

    fields.nth(2).fill("1e39")
    c.locator("button", has_text="Infer").click()
    error = c.locator("[data-field=server-error]")
    error.wait_for()
    body["inputs"][0]["data"] = [*x[:2], 1e39, *x[3:]]
    reply = server.post("/v2/models/six-features/infer", body)
    assert reply.status == 400 and error.inner_text() == f"400: {reply.json['error']}"


def test_the_page_fits_a_phone_and_the_pad_takes_a_touch(browser, server, artifacts):
    page = open_ui(browser, server, viewport={"width": 375, "height": 812}, has_touch=True, is_mobile=True,
                   device_scale_factor=2)
    # A phone's browser zooms out to fit a page wider than its screen; then innerWidth is no longer 375.
    fits = "window.innerWidth === 375 && document.documentElement.scrollWidth <= 375"
    assert page.evaluate(fits), "the page is wider than 375 px"
    for name in CLASSIFIERS:
        left, right = card(page, name).locator("canvas.pad").evaluate(
            "c => [c.getBoundingClientRect().left, c.getBoundingClientRect().right]")
        assert 0 <= left and right <= 375 and right - left >= 200, (name, left, right)
    c = card(page, "fashion-mnist")
    c.locator("canvas.pad").scroll_into_view_if_needed()
    box = c.locator("canvas.pad").bounding_box()
    page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    c.locator(".bar").nth(9).wait_for()
    assert seen(c).max() > 0, "the tap left no mark in the model's input"
    assert page.evaluate(fits), "the answer made the page wider than 375 px"
    page.screenshot(path=artifacts / "ui-phone.png", full_page=True)


# --- the Swagger page ----------------------------------------------------------------------------------

def test_the_swagger_page_says_what_this_service_is(browser, server, artifacts):
    info = server.expect(server.get("/docs.json"), 200)["info"]
    assert info["title"] == "train-to-deploy"
    assert info["version"] == server.expect(server.get("/v2"), 200)["version"] != "None"
    assert "contact" not in info and "/ui" in info["description"]
    # BentoML's placeholder text is gone, and no badge image to fetch (the description may name BentoML's own 400s)
    assert "created with BentoML" not in info["description"] and "http" not in info["description"]
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.get_by_text("the page for people").wait_for()
    page.screenshot(path=artifacts / "swagger.png")


# --- offline: nothing leaves the machine ---------------------------------------------------------------

HTML_PAGES = ("/", "/ui", "/ui/")


def test_no_page_asks_anything_of_another_machine(browser, server):
    """A model server behind a firewall, or on a laptop offline, serves pages that work there and tell no
    third party who opened them. Each HTML page is opened by 127.0.0.1 and by another name for this machine
    (Swagger UI asks validator.swagger.io for a badge only when the page's host is not localhost)."""
    spec = server.expect(server.get("/docs.json"), 200)
    gets = [p for p, item in spec["paths"].items() if "get" in item and "{" not in p]
    html = [p for p in {*gets, *HTML_PAGES, "/docs.json", "/schema.json"}
            if server.get(p).content_type.startswith("text/html")]
    assert sorted(html) == sorted(HTML_PAGES)  # a new page is opened below once it is added to HTML_PAGES
    operations = sum(len(item) for item in spec["paths"].values())
    for host in ("127.0.0.1", OTHER_NAME):
        origin = f"http://{host}:{server.port}"
        for path in HTML_PAGES:
            page = browser.new_context().new_page()
            requested, errors = [], []
            page.on("request", lambda r: requested.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)  # CSP refusals, 404s
            page.goto(origin + path)
            if path == "/":  # Swagger UI drew the document: one block per operation
                page.locator(".opblock").first.wait_for()
                assert page.locator(".opblock").count() == operations
            else:
                page.wait_for_function("document.querySelectorAll('.card').length === 4")
            page.wait_for_load_state("networkidle")  # scripts that load more have had their turn
            page.context.close()
            elsewhere = [url for url in requested if not url.startswith(origin + "/")]
            assert len(requested) > 1 and elsewhere == [], (origin + path, elsewhere)
            assert errors == [], (origin + path, errors)
