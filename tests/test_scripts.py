"""The scripts outside the packages run end to end in short modes, so none of them can rot unnoticed:
the README main job's last step (`serve/demo.sh --once`) and the benchmarks in `bench/`.

They run on the suite's tiny exported models (`serving.exported`); the numbers they print are not
checked (timings belong in BENCHMARKS.md), only that each script finishes and prints what it promises.
"""

import json
import re
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import REPO, write_image_set
from serving import copy_store, env_for, exported
import zygote

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return exported(tmp_path_factory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict, timeout: float) -> str:
    if cmd[0] == sys.executable:  # a benchmark's smoke test checks what it prints, not its children's start-up
        proc = zygote.run(cmd[1:], REPO, env, timeout, fork_children=True)
    else:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_demo_script_serves_and_answers_the_sample_request(base, tmp_path):
    home = copy_store(base, tmp_path / "bentoml")
    log = tmp_path / "serve.log"
    out = run(["bash", "serve/demo.sh", "--once"], env_for(home, PORT=str(free_port()), LOG=str(log)), 180)
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["model"] == base.tags["product"]
    assert isinstance(answer["y"], float) and answer["extrapolated"] is False
    assert log.stat().st_size > 0  # the server's log went where LOG said, not into the repository


def test_inference_benchmark_runs_in_a_short_mode(base, tmp_path):
    out = run([sys.executable, "bench/inference.py", "--product", str(base.root / "product" / "best.pt"),
               "--classifier", str(base.root / "fashion-mnist" / "best.pt"), "--seconds", "0.05"],
              env_for(copy_store(base, tmp_path / "bentoml")), 300)
    for label in ("product", "classifier"):
        for runtime in ("eager", "torchscript", "onnxruntime"):
            assert re.search(rf"^{label}\s+batch\s+1024\s+{runtime}\s+median", out, re.M), out


def test_compare_benchmark_runs_ours_against_the_reference(tmp_path):
    out = run([sys.executable, "bench/compare.py", "product", "--repeats", "1", "--config", "configs/product_fast.yaml"],
              env_for(tmp_path / "bentoml"), 300)
    for key in ("train_s", "wall_s", "rss_mib", "quality"):
        assert re.search(rf"^median {key}\s+reference\s+[\d.]+\s+ours\s+[\d.]+\s+ours/reference", out, re.M), out


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (.ci/run installs it)")
def test_serving_benchmark_runs_in_a_short_mode(base, tmp_path):
    home = copy_store(base, tmp_path / "bentoml")  # the suite's exports, served as they are
    out = run([sys.executable, "bench/serving.py", "--seconds", "1", "--rounds", "1", "--store", str(home)],
              env_for(home), 300)
    assert "ours / floor requests/s, per round" in out, out
    runs = re.findall(r"^round 1 (?:ours|floor) .* non-2xx (\d+)", out, re.M)
    assert len(runs) == 20 and set(runs) == {"0"}, out  # a side that answers errors measures nothing
    for endpoint in ("/predict", "/predict_batch", "/classify", "/v2 infer[1]", "/v2 infer[256]"):
        for side in ("ours", "floor"):
            assert re.search(rf"^round 1 {side}\s+{re.escape(endpoint)}\s+c=32\s+[\d.]+ req/s", out, re.M), out
    assert re.search(r"^  c=1\s+/v2 infer\[1\] over /predict requests/s: [\d.]+x", out, re.M), out


def test_cnn_selection_tunes_on_validation_and_scores_the_test_set_only_in_final(tmp_path):
    images = write_image_set(tmp_path / "images")
    short = ["--train-args", "--data-dir", str(images), "--data.val_size", "60", "--data.batch_size", "32",
             "--run.epochs", "1", "--log.plots", "false", "--device", "cpu"]
    tune = run([sys.executable, "bench/select_cnn.py", "tune", "--only", "shipped", "skip0.4-e9", "--seeds", "0",
                "--out", str(tmp_path / "runs"), *short], env_for(tmp_path / "bentoml"), 600)
    rows = [json.loads(line) for line in tune.splitlines() if line.startswith("{")]
    assert [(r["name"], r["seed"]) for r in rows] == [("shipped", 0), ("skip0.4-e9", 0)]
    assert all("test_acc" not in r and 0 <= r["val_acc"] <= 100 for r in rows), rows
    for r in rows:  # no tuning run was scored on the test set
        summary = json.loads((tmp_path / "runs" / f"{r['name']}-seed{r['seed']}" / "summary.json").read_text())
        assert summary["test"] is None
    assert re.search(r"^== skip0\.4-e9: val accuracy [\d.]+ ± [\d.]+%, train [\d.]+ ± [\d.]+ s$", tune, re.M), tune
    final = run([sys.executable, "bench/select_cnn.py", "final", "shipped", "--seeds", "10", "11",
                 "--out", str(tmp_path / "runs"), *short], env_for(tmp_path / "bentoml"), 600)
    scored = [json.loads(line) for line in final.splitlines() if line.startswith("{")]
    assert [r["seed"] for r in scored] == [10, 11] and all(0 <= r["test_acc"] <= 100 for r in scored), scored
    pattern = r"^== shipped on seeds \[10, 11\]: test accuracy [\d.]+ ± [\d.]+% \(min [\d.]+\)"
    assert re.search(pattern, final, re.M), final
