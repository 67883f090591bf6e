"""Models with general signatures, end to end: several inputs and outputs, int64 ids, bool padding masks, sizes that
vary, and text. A user's two tasks (tests/signature_tasks.py: TABULAR, numbers and a category into an embedding with
two outputs; WORDS, a small Transformer encoder over the letters of a word, with its padding mask) go train ->
export -> `bentoml serve` -> /v2, and every answer is compared with the eager model or onnxruntime on the exported
file. The server runs no code of the user's: its PYTHONPATH holds the repository only.
"""

import json
from dataclasses import dataclass
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import one_error_line, train
from serving import Server, export_cli
from signature_tasks import CHARS, MAX_LENGTH, TABULAR, WORDS, words

from export.main import main as export_main
from models.checkpoint import load_checkpoint, predictor_from_checkpoint
from t2d import DataError, Input, Model, Output, Splits, Task
from t2d.splits import split_tensors

TESTS = Path(__file__).resolve().parent


# --- the declaration ---------------------------------------------------------------------------------------------

@dataclass
class NoConfig:
    pass


def net_of(cfg, task):
    return torch.nn.Linear(2, 1)


BAD_DECLARATIONS = {
    "ids scaled": (lambda: Input("ids", (4,), dtype="int64", normalize="feature"), "only float32 inputs are normalized"),
    "no max_length": (lambda: Input("ids", (None,), dtype="int64"), "give max_length"),
    "unknown dtype": (lambda: Input("x", (2,), dtype="float16"), "Input.dtype must be one of float32, int64, bool"),
    "tokenizer on floats": (lambda: Input("x", (None,), max_length=4, tokenizer=CHARS), "it must be int64 ids"),
    "per-feature stats of a sequence": (lambda: Input("x", (None,), max_length=4, normalize="feature"),
                                        "normalize it 'global' or 'none'"),
    "a dim named batch": (lambda: Input("x", (None,), dtype="int64", max_length=4, dims=("batch",)), "not 'batch'"),
    "mask of nothing": (lambda: Task("t", "regression", inputs=(Input("x", (2,)), Input("m", (None,), dtype="bool",
                                                                                          padding_mask_of="ids")),
                                     output=Output("y", 1), data=lambda o: None, models={"n": Model(NoConfig, net_of)}),
                        "is the padding mask of 'ids'"),
    "unknown target": (lambda: Task("t", "regression", input=Input("x", (2,)), outputs=(Output("y", 1),),
                                    target="z", data=lambda o: None, models={"n": Model(NoConfig, net_of)}),
                       "Task.target 'z' is not one of the outputs"),
    "a name twice": (lambda: Task("t", "regression", input=Input("y", (2,)), output=Output("y", 1),
                                  data=lambda o: None, models={"n": Model(NoConfig, net_of)}), "must differ"),
    "both forms": (lambda: Task("t", "regression", input=Input("z", (2,)), inputs=(Input("x", (2,)),),
                                output=Output("y", 1), data=lambda o: None, models={"n": Model(NoConfig, net_of)}),
                   "give Task.input or Task.inputs, not both"),
}


@pytest.mark.parametrize("name", BAD_DECLARATIONS)
def test_a_bad_signature_is_a_value_error_that_says_what_to_fix(name):
    make, message = BAD_DECLARATIONS[name]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_the_short_form_and_the_long_form_are_one_task():
    short = Task("t", "regression", input=Input("x", (2,)), output=Output("y", 1), data=lambda o: None,
                 models={"n": Model(NoConfig, net_of)})
    long = Task("t", "regression", inputs=(Input("x", (2,)),), outputs=(Output("y", 1),), data=lambda o: None,
                models={"n": Model(NoConfig, net_of)})
    assert short.inputs == long.inputs and short.outputs == long.outputs and short.target == long.target == "y"
    assert WORDS.inputs[1].max_length == MAX_LENGTH and WORDS.inputs[1].dims == ("length",)  # the mask's: its ids'
    assert WORDS.input.name == "ids" and WORDS.output.name == "logits" and TABULAR.output.name == "y"


# --- data: padding, sizes, masks ---------------------------------------------------------------------------------

def test_text_is_tokenized_padded_and_each_batch_cut_to_its_longest():
    texts, labels = words(20, torch.Generator().manual_seed(5))
    x, y = split_tensors(WORDS, ({"ids": texts}, labels), "train")
    ids, padding = x.tensors
    lengths = torch.tensor([len(t) for t in texts])
    assert ids.shape == (20, int(lengths.max())) and ids.dtype == torch.int64 and padding.dtype == torch.bool
    for row, text in zip(ids, texts):
        assert row[:len(text)].tolist() == CHARS.encode(text, MAX_LENGTH) and (row[len(text):] == 0).all()
    assert torch.equal(padding, torch.arange(ids.shape[1]) >= lengths[:, None])  # True at padding, as PyTorch's
    short = (lengths == lengths.min()).nonzero()[:2, 0]
    b_ids, b_padding = x.batch(short)
    assert b_ids.shape[1] == int(lengths.min()) and not b_padding.any()  # cut to the batch's own longest
    # The same samples as a Dataset of (x, y), each a string: the same tensors.
    dataset = [({"ids": t}, int(label)) for t, label in zip(texts, labels)]

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return dataset[i]

    again, _ = split_tensors(WORDS, Pairs(), "train")
    assert all(torch.equal(a, b) for a, b in zip(again.tensors, x.tensors))


def test_padded_id_tensors_and_per_sample_lists_give_the_same_features():
    task = Task("seq", "regression", inputs=(Input("ids", (None,), dtype="int64", max_length=6, range=(0, 9)),
                                            Input("pad", (None,), dtype="bool", padding_mask_of="ids")),
                output=Output("y", 1), data=lambda o: None, models={"n": Model(NoConfig, net_of)})
    samples = [torch.tensor([3, 4, 5]), torch.tensor([7]), torch.tensor([1, 2, 3, 4, 5, 6])]
    listed, _ = split_tensors(task, (samples, torch.zeros(3, 1)), "train")
    padded = torch.zeros(3, 6, dtype=torch.int64)
    for row, s in zip(padded, samples):
        row[:len(s)] = s
    from_tensor, _ = split_tensors(task, (padded, torch.zeros(3, 1)), "train")
    assert all(torch.equal(a, b) for a, b in zip(listed.tensors, from_tensor.tensors))
    assert listed.lengths["length"].tolist() == [3, 1, 6]


BAD_DATA = {
    "text too long": (WORDS, ({"ids": ["abc", "a" * (MAX_LENGTH + 1)]}, torch.tensor([0, 1])),
                      f"the text has {MAX_LENGTH + 1} characters; the model takes at most {MAX_LENGTH}"),
    "ids not strings": (WORDS, ({"ids": [[1, 2], [3]]}, torch.tensor([0, 1])), "give it strings"),
    "category out of range": (TABULAR, ({"numbers": torch.ones(2, 3), "category": torch.tensor([[1], [5]])},
                                        torch.ones(2, 1)), "holds 5, outside the input's range [0, 4]"),
    "category not whole": (TABULAR, ({"numbers": torch.ones(2, 3), "category": torch.tensor([[1.5], [2.0]])},
                                     torch.ones(2, 1)), "not whole numbers; an int64 input takes integers"),
    "an input missing": (TABULAR, ({"numbers": torch.ones(2, 3)}, torch.ones(2, 1)),
                         "gives inputs ['numbers']; the task takes ['numbers', 'category']"),
    "the mask given": (WORDS, ({"ids": ["ab", "c"], "padding": [[0, 0], [0, 1]]}, torch.tensor([0, 1])),
                       "padding masks are made by the toolkit"),
}


@pytest.mark.parametrize("name", BAD_DATA)
def test_data_that_breaks_the_signature_is_one_data_error(name):
    task, split, message = BAD_DATA[name]
    with pytest.raises(DataError) as e:
        split_tensors(task, split, "train")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


SEEN_WIDTHS = []  # the widths of the batches the collating task's network was given


def pad_to_fours(samples: list[dict]) -> dict:
    """A task's own collate: ids padded to a multiple of 4 (as some kernels like), not to the batch's longest."""
    width = -(-max(len(s["ids"]) for s in samples) // 4) * 4
    ids = torch.zeros(len(samples), width, dtype=torch.int64)
    for row, s in zip(ids, samples):
        row[:len(s["ids"])] = torch.as_tensor(s["ids"])
    return {"ids": ids}


class Recording(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.out = torch.nn.Linear(4, 1)

    def forward(self, ids, padding):
        SEEN_WIDTHS.append(ids.shape[1])
        keep = (~padding).unsqueeze(-1).float()
        return self.out((self.embed(ids) * keep).sum(1) / keep.sum(1).clamp(min=1))


def test_a_task_s_own_collate_batches_its_samples(tmp_path, monkeypatch):
    task = sequence_task(Recording, "fours", max_length=8, collate=pad_to_fours)
    monkeypatch.setattr(sys.modules[__name__], "FOURS", task, raising=False)
    del SEEN_WIDTHS[:]
    train(["--task", "test_signatures:FOURS", "--data.batch_size", "8"], tmp_path)
    assert SEEN_WIDTHS and all(w % 4 == 0 for w in SEEN_WIDTHS), SEEN_WIDTHS
    x, _ = split_tensors(task, task.data(None).train, "train")
    (ids, padding) = x.batch(torch.arange(5))
    lengths = (ids != 0).sum(1)
    assert ids.shape[1] == 4 and torch.equal(padding, torch.arange(4) >= lengths[:, None])  # masks made after it


def test_group_by_length_batches_similar_sizes_and_keeps_every_sample_once():
    from train.fit import group_by_length

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 25, (1000,), generator=g)
    batches = list(torch.randperm(1000, generator=g).split(32))
    grouped = group_by_length(batches, sizes, seed=3)
    assert sorted(torch.cat(grouped).tolist()) == list(range(1000))
    assert sorted(len(b) for b in grouped) == sorted(len(b) for b in batches)
    spread = lambda bs: float(torch.tensor([float(sizes[b].max() - sizes[b].min()) for b in bs]).mean())  # noqa: E731
    assert spread(grouped) < spread(batches) / 4  # a batch's samples are nearly the same size
    assert [b.tolist() for b in group_by_length(batches, sizes, seed=3)] == [b.tolist() for b in grouped]


def test_group_by_length_trains_a_text_task_and_is_refused_without_sizes_that_vary(tmp_path, capsys):
    from train.main import main as train_main

    summary = train(["--task", "signature_tasks:WORDS", "--data.group_by_length", "true", "--epochs", "2"], tmp_path)
    assert summary["val"]["accuracy"] > 50  # three classes: it learned
    assert train_main(["--task", "signature_tasks:TABULAR", "--data.group_by_length", "true",
                            "--out", str(tmp_path / "no"), "--device", "cpu"]) == 2
    assert "data.group_by_length groups samples by size" in one_error_line(capsys.readouterr().err)


# --- train and export ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Both tasks trained (in this process) and exported with registration into ROOT/bentoml; WORDS also as an int8
    variant, registered last."""
    root = tmp_path_factory.mktemp("signatures")
    (root / "user").mkdir()  # the int8 export's working directory, which it must leave as it found it
    for name in ("TABULAR", "WORDS"):
        train(["--task", f"signature_tasks:{name}"], root / name)
        done = export_cli(["--task", f"signature_tasks:{name}", "--checkpoint", str(root / name / "best.pt"),
                           "--out", str(root / name / "export")], root / "bentoml", path=[TESTS], timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    done = export_cli(["--task", "signature_tasks:WORDS", "--checkpoint", str(root / "WORDS" / "best.pt"),
                       "--out", str(root / "WORDS" / "export-int8"), "--format", "onnx", "--quantize", "int8",
                       "--batch-sizes", "1,7"], root / "bentoml", root / "user", path=[TESTS], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def eager(root: Path, name: str):
    task = {"TABULAR": TABULAR, "WORDS": WORDS}[name]
    return predictor_from_checkpoint(load_checkpoint(root / name / "best.pt", task=task), task)


@pytest.mark.slow
def test_parity_covers_every_output_at_several_sizes_and_the_tokenizer(runs):
    report = json.loads((runs / "WORDS" / "export" / "parity.json").read_text())
    assert report["passed"] and report["sizes"][0] == 1 and report["sizes"][-1] == MAX_LENGTH
    assert len(report["sizes"]) >= 3  # 1, a middle size, the longest held-out word, the maximum
    checked = {(c["format"], c["batch"], c["size"]) for c in report["checks"]}
    assert checked == {(f, b, s) for f in ("onnx", "torchscript") for b in (1, 7, 1024) for s in report["sizes"]}
    assert all(len(c["shape"]) == 2 and c["shape"][1] == [c["batch"], 16] for c in report["checks"])  # both outputs
    assert report["tokenizers"] == {"ids": {"strings": 60, "passed": True}}
    tabular = json.loads((runs / "TABULAR" / "export" / "parity.json").read_text())
    assert tabular["passed"] and "sizes" not in tabular
    assert all(c["output_names"] == ["y", "embedding"] for c in tabular["checks"])


@pytest.mark.slow
def test_the_contract_and_the_graph_say_what_the_task_declares(runs):
    contract = onnx_contract(runs / "WORDS" / "export" / "model.onnx")
    ids, padding = contract["inputs"]
    assert ids == {"name": "ids", "dtype": "int64", "shape": ["batch", "length"], "range": [0, CHARS.size - 1],
                   "description": "", "max_length": MAX_LENGTH, "pad": 0, "tokenizer": CHARS.to_dict()}
    assert padding["dtype"] == "bool" and padding["padding_mask_of"] == "ids" and padding["shape"] == ["batch", "length"]
    assert [o["name"] for o in contract["outputs"]] == ["logits", "pooled"] and contract["target"] == "logits"
    graph = onnx.load(str(runs / "WORDS" / "export" / "model.onnx")).graph
    types = {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
             for v in graph.input}
    assert types["ids"][0] == onnx.TensorProto.INT64 and types["padding"][0] == onnx.TensorProto.BOOL
    assert all(isinstance(d, str) for d in types["ids"][1])  # batch and length both dynamic


def onnx_contract(path: Path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["contract"])


class FixedLength(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)

    def forward(self, ids, padding):  # a view that only works at length 3: the exporter traces the 3 as a constant
        return self.embed(ids).reshape(len(ids), 12)[:, :1]


def sequence_task(net, name: str = "seq", max_length: int = 3, collate=None) -> Task:
    def data(opts):
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(1, 10, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g) for _ in range(60)]
        return Splits(train=(ids, torch.rand(60, 1)), test=(ids[:20], torch.rand(20, 1)))

    return Task(name, "regression", inputs=(Input("ids", (None,), dtype="int64", max_length=max_length, range=(0, 9)),
                                           Input("padding", (None,), dtype="bool", padding_mask_of="ids")),
                output=Output("y", 1), data=data, models={"net": Model(NoConfig, lambda cfg, task: net())},
                defaults={"run": {"epochs": 1}, "data": {"val_size": 10}}, collate=collate)


@pytest.mark.slow
def test_a_size_the_graph_does_not_keep_is_refused_at_export(tmp_path, capsys, monkeypatch):
    """A network that works at one length only is traced with that length as a constant: refused with one line at
    export, not found out by the server's first request of another length."""
    net, message = FixedLength, "the network fixes axis 1 (length) of input ids to 3"
    module = tmp_path / "seq_task.py"
    module.write_text("import sys\nTASK = sys.modules['test_signatures'].sequence_task(sys.modules['test_signatures']."
                      f"{net.__name__})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("seq_task", None)
    train(["--task", "seq_task:TASK"], tmp_path / "run")
    capsys.readouterr()
    assert export_main(["--task", "seq_task:TASK", "--checkpoint", str(tmp_path / "run" / "best.pt"),
                        "--out", str(tmp_path / "export"), "--no-register"]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    sys.modules.pop("seq_task", None)


# --- serving ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(runs):
    """The float models (the words int8 variant is newer: pinned away here, served in its own test)."""
    srv = Server(runs / "bentoml", runs / "serve.log", T2D_MODELS="words@fp32")
    yield srv.wait_ready()
    srv.stop()


def v2(server, model: str, inputs: list[dict], **extra):
    return server.post(f"/v2/models/{model}/infer", {"inputs": inputs, **extra})


def ids_of(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Training's tokenization of `texts`, padded, and its padding mask."""
    x, _ = split_tensors(WORDS, ({"ids": texts}, torch.zeros(len(texts), dtype=torch.long)), "request")
    return x.tensors[0].numpy(), x.tensors[1].numpy()


TEXTS = ["abc", "hij", "opqrstuo", "g", "zzz", "ébc"]  # z and é are not in the vocabulary: <unk>


@pytest.mark.slow
def test_metadata_shows_minus_one_for_every_size_that_varies(server):
    meta = server.expect(server.get("/v2/models/words"), 200)
    assert meta["inputs"] == [{"name": "ids", "datatype": "INT64", "shape": [-1, -1]},
                              {"name": "padding", "datatype": "BOOL", "shape": [-1, -1]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "pooled", "datatype": "FP32", "shape": [-1, 16]}]


@pytest.mark.slow
def test_ids_text_and_ids_without_mask_all_give_the_eager_answer(server, runs):
    ids, padding = ids_of(TEXTS)
    with torch.no_grad():
        want = [t.numpy() for t in eager(runs, "WORDS")(torch.from_numpy(ids), torch.from_numpy(padding))]
    full = server.expect(v2(server, "words", [
        {"name": "ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.ravel().tolist()},
        {"name": "padding", "shape": list(padding.shape), "datatype": "BOOL", "data": padding.ravel().tolist()}]), 200)
    no_mask = server.expect(v2(server, "words", [
        {"name": "ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.ravel().tolist()}]), 200)
    text = server.expect(v2(server, "words", [{"name": "ids", "shape": [len(TEXTS)], "datatype": "BYTES",
                                               "data": TEXTS}]), 200)
    for answer in (full, no_mask, text):
        got = {o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"]) for o in answer["outputs"]}
        np.testing.assert_allclose(got["logits"], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["pooled"], want[1], rtol=1e-5, atol=1e-5)
    assert text["outputs"] == full["outputs"] == no_mask["outputs"]  # the server's tokenization is training's


@pytest.mark.slow
def test_the_multi_input_model_answers_both_outputs_as_the_eager_model(server, runs):
    rng = np.random.default_rng(0)
    numbers = (rng.random((4, 3)) * [10, 1, 100]).astype(np.float32)
    category = np.array([[0], [4], [2], [1]])
    answer = server.expect(v2(server, "tabular", [
        {"name": "numbers", "shape": [4, 3], "datatype": "FP32", "data": numbers.ravel().tolist()},
        {"name": "category", "shape": [4, 1], "datatype": "INT64", "data": category.ravel().tolist()}]), 200)
    with torch.no_grad():
        want = eager(runs, "TABULAR")(torch.from_numpy(numbers), torch.from_numpy(category))
    got = {o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"]) for o in answer["outputs"]}
    np.testing.assert_allclose(got["y"], want[0].numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["embedding"], want[1].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tritonclient_with_its_defaults_sends_int64_ids_and_bytes_text(server, runs):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    session = ort.InferenceSession(str(runs / "WORDS" / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, padding = ids_of(TEXTS)
    want = session.run(None, {"ids": ids, "padding": padding})
    as_ids = httpclient.InferInput("ids", list(ids.shape), "INT64")
    as_ids.set_data_from_numpy(ids)
    mask = httpclient.InferInput("padding", list(padding.shape), "BOOL")
    mask.set_data_from_numpy(padding)
    as_text = httpclient.InferInput("ids", [len(TEXTS)], "BYTES")
    as_text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_))
    for inputs in ([as_ids, mask], [as_text]):
        result = client.infer("words", inputs)
        np.testing.assert_allclose(result.as_numpy("logits"), want[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("pooled"), want[1], rtol=1e-6, atol=1e-6)
    client.close()


IDS = {"name": "ids", "datatype": "INT64"}
BAD_REQUESTS = {
    "floats for ids": ("words", [{**IDS, "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}],
                       "datatype is \"FP32\"; send INT64 or BYTES text"),
    "a non-integer id": ("words", [{**IDS, "shape": [1, 2], "data": [1, 2.5]}], "an INT64 input takes integers"),
    "longer than the model takes": ("words", [{**IDS, "shape": [1, MAX_LENGTH + 1], "data": [2] * (MAX_LENGTH + 1)}],
                                    f"longer than the model takes (at most {MAX_LENGTH})"),
    "an id outside the vocabulary": ("words", [{**IDS, "shape": [1, 2], "data": [2, CHARS.size]}],
                                     f"outside the valid range [0, {CHARS.size - 1}]"),
    "text too long": ("words", [{**IDS, "datatype": "BYTES", "shape": [1], "data": ["a" * 13]}],
                      f"the text has 13 characters; the model takes at most {MAX_LENGTH}"),
    "empty text": ("words", [{**IDS, "datatype": "BYTES", "shape": [1], "data": [""]}], "the text is empty"),
    "a number as text": ("words", [{**IDS, "datatype": "BYTES", "shape": [1], "data": [7]}], "BYTES data are strings"),
    "mask of another length": ("words", [{**IDS, "shape": [1, 2], "data": [2, 3]},
                                         {"name": "padding", "datatype": "BOOL", "shape": [1, 3],
                                          "data": [False] * 3}], "must have the same"),
    "a number in a mask": ("words", [{**IDS, "shape": [1, 2], "data": [2, 3]},
                                     {"name": "padding", "datatype": "BOOL", "shape": [1, 2], "data": [0, 1]}],
                           "send true or false"),
    "text for a model without a tokenizer": ("tabular", [{"name": "category", "datatype": "BYTES", "shape": [1],
                                                          "data": ["x"]}], 'datatype is "BYTES"; send INT64'),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
@pytest.mark.slow
def test_a_request_that_breaks_the_signature_is_a_400_with_one_line(server, name):
    model, inputs, message = BAD_REQUESTS[name]
    reply = v2(server, model, inputs)
    assert reply.status == 400 and message in reply.json["error"], (reply.status, reply.body)
    assert server.expect(v2(server, "words", [{**IDS, "datatype": "BYTES", "shape": [1], "data": ["ab"]}]), 200)


@pytest.mark.slow
def test_the_int8_transformer_passes_its_self_check_and_answers_text(runs, tmp_path):
    """The Transformer's int8 variant (dynamic quantization of its matrix products), served after its self-check."""
    report = json.loads((runs / "WORDS" / "export-int8" / "quantization.json").read_text())
    assert list((runs / "user").iterdir()) == []  # onnxruntime's shape-inference leftovers stay in a temporary folder
    assert report["passed"] and report["method"] == "dynamic" and report["self_check"]["rows"] == 60
    srv = Server(runs / "bentoml", tmp_path / "int8.log").wait_ready()
    try:
        answer = srv.expect(v2(srv, "words", [{**IDS, "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]), 200)
        log = srv.log()
    finally:
        srv.stop()
    assert answer["parameters"] == {"variant": "int8"} and "(int8) passed its self-check" in log
    ids, padding = ids_of(TEXTS)
    int8 = ort.InferenceSession(str(runs / "WORDS" / "export-int8" / "model.int8.onnx"),
                                providers=["CPUExecutionProvider"])
    want = int8.run(["logits"], {"ids": ids, "padding": padding})[0]
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(want.shape), want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_the_page_has_a_text_box_for_a_model_that_takes_text(server, runs):
    """/ui in Debian's chromium: the words model's card takes a typed word and shows the server's answer for it."""
    import shutil

    from playwright.sync_api import sync_playwright

    from serving import softmax

    answer = server.expect(v2(server, "words", [{**IDS, "datatype": "BYTES", "shape": [1], "data": ["hijk"]}]), 200)
    want = softmax(np.array(answer["outputs"][0]["data"], dtype=np.float64))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"))
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.port}/ui")
            card = page.locator('.card[data-model="words"]')
            card.locator("input[name=text]").fill("hijk")
            card.locator("button", has_text="Infer").click()
            card.locator("[data-field=label]").wait_for()
            label = card.locator("[data-field=label]").inner_text()
            shown = [float(v) for v in card.locator(".bar").evaluate_all("bars => bars.map(b => b.dataset.p)")]
            card.locator("input[name=text]").fill("a" * (MAX_LENGTH + 1))  # longer than the input takes
            card.locator("button", has_text="Infer").click()
            card.locator("[data-field=server-error]").wait_for()
            error = card.locator("[data-field=server-error]").inner_text()
        finally:
            browser.close()
    assert label == f"{int(want.argmax())}: {WORDS.classes[int(want.argmax())]}"
    np.testing.assert_allclose(shown, want, rtol=1e-6, atol=1e-9)
    assert error.startswith("400: ") and "the model takes at most 12" in error


def test_language_id_without_the_word_lists_stops_with_one_line_naming_the_packages(tmp_path, capsys):
    from train.main import main as train_main

    assert train_main(["--task", "examples.language_id:TASK", "--data.dir", str(tmp_path), "--out",
                            str(tmp_path / "run"), "--device", "cpu"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"in {tmp_path}: apt-get install wamerican wfrench wngerman wspanish witalian wportuguese wdutch" in line


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/dict/french").is_file(), reason="Debian's word lists are not installed")
def test_language_id_words_are_unambiguous_balanced_and_split_the_same_every_run():
    from examples.language_id import LISTS, labelled_words, read_lists

    texts, labels = labelled_words("/usr/share/dict", 300)
    assert len(texts) == 300 * len(LISTS) and np.bincount(labels).tolist() == [300] * len(LISTS)
    lists = read_lists("/usr/share/dict")
    for text, label in zip(texts[:200], labels[:200]):
        found = [lang for lang, words_ in lists.items() if text in words_]
        assert found == [list(LISTS)[label]], (text, found)  # in its own list and no other
    assert labelled_words("/usr/share/dict", 300) == (texts, labels)


def test_regression_plots_name_the_task_s_own_output_one_row_per_value(tmp_path):
    from train import plots

    true, pred = torch.rand(50, 2), torch.rand(50, 2)
    labels = plots.predicted_vs_true(true, pred, Output("progression", 2), tmp_path / "two.png")
    assert labels == ["true progression[0]", "true progression[1]"] and (tmp_path / "two.png").stat().st_size > 0
    assert plots.predicted_vs_true(true[:, :1], pred[:, :1], Output("y", 1), tmp_path / "one.png") == ["true y"]
    many = plots.predicted_vs_true(torch.rand(9, 6), torch.rand(9, 6), Output("v", 6), tmp_path / "six.png")
    assert len(many) == plots.MAX_PANELS
