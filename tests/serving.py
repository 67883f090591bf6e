"""Shared by the serving tests: a real `bentoml serve` process on a free 127.0.0.1 port, HTTP helpers,
and a model store filled by real `python -m train` and `python -m export` runs.

The tiny models are trained and exported once per pytest session (`exported`); each test module
copies that pristine store (`copy_store`) and registers whatever extra entries it needs in its copy.
"""

import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from conftest import PRODUCT, REPO, train, write_image_set
import zygote
from PIL import Image

# --- processes ---------------------------------------------------------------------------------


def env_for(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("T2D_", "BENTOML_CONFIG"))}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra)
    return env


def export_cli(args: list, home: Path, cwd: Path = REPO, *, path: tuple = (), timeout: float = 300
               ) -> subprocess.CompletedProcess:
    """`python -m export ARGS` from `cwd`, forked from the zygote, registering into the store at `home`; `path`:
    folders after the repository on PYTHONPATH (where a test's own task module is)."""
    env = env_for(home)
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], *map(str, path)])
    return zygote.run(["-m", "export", *map(str, args)], cwd, env, timeout)


def store_entries(home: Path) -> list[dict]:
    """Every model in the store at `home`, as `bentoml models list -o json` reports it: tag, labels, metadata, folder
    and files."""
    code = ("import json, os, bentoml; print(json.dumps([{'tag': str(m.tag), 'labels': m.info.labels, "
            "'metadata': m.info.metadata, 'path': m.path, 'files': sorted(os.listdir(m.path))} "
            "for m in bentoml.models.list()]))")
    out = zygote.run(["-c", code], REPO, env_for(home), 120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def python(code: str, home: Path, *args: str, timeout: float = 120, fresh: bool = False,
           **env: str) -> subprocess.CompletedProcess:
    """`python -c CODE ARGS` with the store at `home`; `fresh`: a new interpreter, not a fork of the zygote, whose
    modules (torch among them) are already imported."""
    if fresh:
        return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env_for(home, **env),
                              capture_output=True, text=True, timeout=timeout)
    return zygote.run(["-c", code, *args], REPO, env_for(home, **env), timeout)


def traffic(**limits) -> dict[str, str]:
    """The environment that overrides the service's `traffic` limits (timeout, max_concurrency) in BentoML's config."""
    return {"BENTOML_CONFIG_OVERRIDES": json.dumps({"services": {"TrainToDeploy": {"traffic": limits}}})}


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc/PID/status (VmRSS, in KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for process {pid}")


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    connection: str = ""  # the Connection header, lowercase: "close" when the server closes after this answer

    @property
    def json(self):
        return json.loads(self.body)


class Server:
    """`bentoml serve` on a free 127.0.0.1 port, in its own process group, logging to a file.

    `bentoml serve` is a circus arbiter: it binds the port, then starts the worker process (its own
    session, so a signal to our process group reaches the arbiter only) that loads the models and
    answers. Both are forked from the zygote where they can be (`zygote.start`), which saves their imports:
    circus starts a stand-in for the worker (`zygote.worker`) that it watches and signals as it would the
    worker. `real_worker`: the worker is a fresh interpreter, for a test that watches the worker process itself
    (its memory, its end)."""

    def __init__(self, home: Path, log: Path, target: tuple[str, ...] = (), real_worker: bool = False, **env: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = log
        with open(log, "w") as f:
            self.proc = zygote.start(
                ["-m", "bentoml", "serve", *target, "--host", "127.0.0.1", "--port", str(self.port)], REPO,
                env_for(home, **env), stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                fork_children=not real_worker)

    def wait_ready(self, deadline_s: float = 90, path: str = "/readyz") -> "Server":
        """Once `path` answers 200 (`/livez` for a server that is not meant to become ready)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", path, timeout=5).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"bentoml serve: {path} not 200 after {deadline_s} s:\n{self.log()}")

    def workers(self) -> list[int]:
        """The worker processes' ids (the arbiter's children)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:  # the field after the state: the parent's id
                pids.append(int(stat.parent.name))
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            workers = self.workers()
            os.killpg(self.proc.pid, signal.SIGTERM)  # the arbiter stops its workers, then exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for pid in workers:  # in their own sessions: not reached by killpg
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            try:
                conn.request(method, path, body, headers or {})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer (413) and close before reading all we send; its answer still counts
            r = conn.getresponse()
            return Reply(r.status, r.getheader("Content-Type", ""), r.read(), r.getheader("Connection", "").lower())
        finally:
            conn.close()

    def get(self, path: str, timeout: float = 60) -> Reply:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body, content_type: str | None = "application/json", **headers: str) -> Reply:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if content_type is not None:
            headers["Content-Type"] = content_type
        return self.request("POST", path, body, headers)

    def expect(self, reply: Reply, status: int):
        """The reply's JSON, after checking its status; the server log's tail tells why when it differs."""
        assert reply.status == status, (f"expected {status}, got {reply.status} {reply.body[:400]!r}\n"
                                        f"--- server log (last 4000 chars) ---\n{self.log()[-4000:]}")
        assert reply.content_type.startswith("application/json"), reply.content_type
        return reply.json

    def start_slowly(self, path: str, body: bytes, content_type: str = "application/json",
                     first: int = 5) -> "SlowRequest":
        """A request whose headers and first `first` body bytes are sent now, the rest on `finish`: in
        flight on the server (counted by max_concurrency, timed by the timeout) until then."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body[:first])
        return SlowRequest(sock, body[first:])


@dataclass
class SlowRequest:
    sock: socket.socket
    rest: bytes

    def finish(self) -> Reply:
        """Send the rest of the body and read the answer."""
        self.sock.sendall(self.rest)
        return self.reply()

    def reply(self, timeout: float = 60) -> Reply:
        """Read the answer (without sending more)."""
        self.sock.settimeout(timeout)
        r = http.client.HTTPResponse(self.sock)
        try:
            r.begin()
            return Reply(r.status, r.getheader("Content-Type", ""), r.read(), r.getheader("Connection", "").lower())
        finally:
            self.sock.close()


# --- bodies --------------------------------------------------------------------------------------

def png(pixels: np.ndarray, mode: str = "L") -> bytes:
    buf = BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), "L").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def image_with(value) -> dict:
    image = [[0] * 28 for _ in range(28)]
    image[5][7] = value
    return {"image": image}


# --- the model store -----------------------------------------------------------------------------

@dataclass
class Exported:
    home: Path  # a BENTOML_HOME holding exactly the two exports, read by every xdist worker: copy it to add entries
    root: Path  # the training runs: ROOT/TASK/best.pt
    tags: dict[str, str]  # task -> tag registered by `python -m export`


_exported: Exported | None = None


def exported(tmp_path_factory) -> Exported:
    """Tiny product and fashion-mnist models, trained here and exported and registered by `python -m export`
    into a fresh store; once per test run, shared by the serving test modules. Under pytest-xdist the first
    worker to ask builds it in the run's common folder while the others wait on a lock, then all read it."""
    global _exported
    if _exported is None:
        base = tmp_path_factory.getbasetemp()
        common = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: pytest-N/popen-gwK
        root = common / "exported"
        with open(common / "exported.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / "tags.json").is_file():
                shutil.rmtree(root, ignore_errors=True)  # what a worker whose build failed left
                (root / "tags.json").parent.mkdir()
                tags = _build_exported(root)
                (root / "tags.json").write_text(json.dumps(tags))
            _exported = Exported(root / "bentoml", root, json.loads((root / "tags.json").read_text()))
    return _exported


def _build_exported(root: Path) -> dict[str, str]:
    home = root / "bentoml"

    def export(task: str) -> subprocess.CompletedProcess:
        return zygote.run(["-m", "export", "--format", "all", "--checkpoint", str(root / task / "best.pt"),
                           "--out", str(root / task / "export")], REPO, env_for(home))

    # Each export runs in the background while the next model trains here. With the plots, which export
    # copies into the store entry for the page at /ui (tests/test_ui.py).
    plots = ["--log.plots", "true"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        train([*PRODUCT, "--epochs", "3", *plots], root / "product")
        exports = {"product": pool.submit(export, "product")}
        data = write_image_set(root / "idx")
        train(["--task", "fashion-mnist", "--data-dir", str(data), "--data.download", "false", "--data.val_size",
               "50", "--data.batch_size", "50", "--epochs", "2", *plots], root / "fashion-mnist")
        exports["fashion-mnist"] = pool.submit(export, "fashion-mnist")
        tags = {}
        for task, job in exports.items():
            done = job.result()
            assert done.returncode == 0, f"python -m export failed for {task}:\n{done.stdout}{done.stderr}"
            tags[task] = f"{task}:{(home / 'models' / task / 'latest').read_text().strip()}"
    return tags


def copy_store(base: Exported, home: Path) -> Path:
    """A private copy of the exported store at `home`, for a module to add entries to."""
    shutil.copytree(base.home, home, symlinks=True)
    return home


def entry_folder(home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return home / "models" / name / version


def pins(tags: dict[str, str]) -> dict[str, str]:
    """The environment that pins the good exports."""
    return {"T2D_PRODUCT_MODEL": tags["product"], "T2D_CLASSIFIER_MODEL": tags["fashion-mnist"]}
