"""A user's own task, all the way: a task file outside the repository goes through the real
`python -m train` and `python -m export` from its folder, then a real `bentoml serve` (which imports no
task code) answers it over the Open Inference Protocol, and the HTTP answer equals the eager model's
on the same raw inputs.
"""

import sys

import numpy as np
import pytest
import torch
from conftest import FAST, cli
from serving import Server, export_cli
from test_task import write_user_tasks

import t2d
from models.checkpoint import load_checkpoint, predictor_from_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The user's folder, with both tasks trained, exported and registered in its store, and a server on it."""
    home = tmp_path_factory.mktemp("user-served")
    module = write_user_tasks(home, prefix="served_")["tasks"]
    for name in ("REG", "IMG"):
        run = cli([*FAST, "--task", f"{module}:{name}", "--out", f"runs/{name}"], home)
        assert run.returncode == 0, run.stderr[-3000:]
        export = export_cli(["--task", f"{module}:{name}", "--checkpoint", f"runs/{name}/best.pt"],
                            home / "bentoml", home)
        assert export.returncode == 0, export.stderr[-3000:]
        assert "registered" in export.stdout
    sys.path.insert(0, str(home))  # the eager reference, in this process, imports the user's module
    try:
        tasks = {name: t2d.resolve(f"{module}:{name}") for name in ("REG", "IMG")}
    finally:
        sys.path.remove(str(home))
    server = Server(home / "bentoml", home / "serve.log").wait_ready()
    yield home, tasks, server
    server.stop()


def eager(home, task, name: str, x: np.ndarray) -> np.ndarray:
    model = predictor_from_checkpoint(load_checkpoint(home / "runs" / name / "best.pt", task=task), task)
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def infer(server, model: str, name: str, x: np.ndarray):
    body = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return server.post(f"/v2/models/{model}/infer", body)


@pytest.mark.parametrize("name", ["REG", "IMG"])
def test_user_task_is_served_over_v2_with_end_to_end_parity(served, name):
    home, tasks, server = served
    task = tasks[name]
    x = task.data(t2d.DataOptions()).test[0][:37].numpy()  # raw units, as a client has them
    meta = server.expect(server.get(f"/v2/models/{task.name}"), 200)
    want = {"name": task.input.name, "datatype": "FP32", "shape": [-1, *task.input.shape]}
    if name == "IMG":  # an image input with a range also takes PNG and JPEG files, and says how it reads them
        want["parameters"] = {"encoded_image": "png,jpeg", "image_mode": "L", "image_size": "8x8",
                              "image_resize": "bilinear", "image_range": "0,1"}
    assert meta["inputs"] == [want]
    assert meta["outputs"] == [{"name": task.output.name, "datatype": "FP32", "shape": [-1, task.output.size]}]
    answer = server.expect(infer(server, task.name, task.input.name, x), 200)
    (out,) = answer["outputs"]
    assert answer["model_name"] == task.name and out["name"] == task.output.name
    assert out["shape"] == [37, task.output.size]
    got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
    want = eager(home, task, name, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if not task.regression:
        assert (got.argmax(1) == want.argmax(1)).all()


def test_user_task_inputs_are_checked_against_its_declaration(served):
    home, tasks, server = served
    img = tasks["IMG"]
    x = np.full((1, 1, 8, 8), 0.5, dtype=np.float32)
    server.expect(infer(server, img.name, img.input.name, x), 200)
    wrong = {
        "input name": infer(server, img.name, "pixels", x),
        "sample shape": infer(server, img.name, img.input.name, np.zeros((1, 1, 8, 7), dtype=np.float32)),
        "outside Input.range": infer(server, img.name, img.input.name, x * 3),  # 1.5 > the declared 1.0
    }
    for what, reply in wrong.items():
        body = server.expect(reply, 400)
        assert isinstance(body.get("error"), str) and body["error"], what
    assert "outside the valid range [0, 1]" in wrong["outside Input.range"].json["error"]
    assert "pixels" in wrong["input name"].json["error"]
    server.expect(server.get("/v2/health/ready"), 200)
