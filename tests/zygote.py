"""`python -m MODULE ARGS`, `python -c CODE ARGS` and `python SCRIPT ARGS` for the suite, forked from a process that
has imported torch.

A fresh interpreter spends about 3 s of CPU importing torch, and 2 s more for torch.onnx and onnxscript, before
it reads its first argument: most of what the suite's hundred-odd runs of `python -m train` and `python -m export`
cost, with 2 s more for the first optimizer (torch._dynamo) and the first ONNX export (torch.export, onnxscript's
op registry) of each process. The zygote imports those third-party libraries (bentoml too) once, pays those
first-use costs once on a toy module, and each run is a fork of it that then does what the interpreter does for
`-m`, `-c` and a script: the run's working directory, environment, stdin/stdout/stderr,
sys.argv and sys.path (sys.path[0] and PYTHONPATH as the interpreter sets them), its module, code or file run as
__main__, then the interpreter's exit (threads joined, atexit handlers) with the run's exit status: a SystemExit's
code, 1 after an uncaught exception (its traceback on stderr), -N after signal N. The project's own packages are
never imported in the zygote, so every run imports train, export, t2d, models and serve afresh, as a user's does.

What a fork cannot give falls back to a real process (`run` decides): a variable the preloaded libraries read
when imported (threads, allocators, CUDA) that differs from the zygote's. T2D_TEST_FORK=0 runs everything as real
processes, to check that the two agree.

    python tests/zygote.py SOCKET    # the zygote itself; `Zygote` starts it
"""

import atexit
import fcntl
import io
import json
import os
import runpy
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

# Read by the preloaded libraries when they are imported (or by the interpreter at start): a run that sets one
# of these differently from the zygote needs a process of its own.
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "TORCH", "PYTORCH_", "CUDA", "NVIDIA_", "LD_", "MALLOC_",
                   "PYTHONHASHSEED", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE", "PYTHONWARNINGS", "PYTHONUTF8",
                   "PYTHONIOENCODING", "PYTHONSAFEPATH", "ORT_", "CUBLAS_", "CUDNN_", "AIOHTTP_", "OTEL_",
                   # bentoml's configuration is loaded at import; BENTOML_HOME, BENTOML_DO_NOT_TRACK and its
                   # debug, quiet and verbosity switches are read at first use, which is never in the zygote, so
                   # each run's own store and settings hold.
                   "BENTOML_CONFIG")
# Matching the prefixes above but read at use, and written into os.environ by torch itself when first used (by
# torch.compile, in the pytest process): whether a test's env was copied before or after that must not matter.
SET_BY_TORCH = ("TORCHINDUCTOR_CACHE_DIR",)
# What torchrun adds to its workers' environment beyond the rank variables: read by torch.distributed when the
# process group starts, not at import.
TORCHRUN_SETS = ("TORCHELASTIC_", "TORCH_NCCL_")
PRELOAD = ("numpy", "torch", "torch.nn", "torch.optim", "torch.utils.data", "torch.onnx", "onnx", "onnxruntime",
           "onnxscript", "PIL.Image", "yaml", "bentoml", "bentoml.models",
           # what `bentoml serve`'s arbiter and worker import beyond those (circus, uvicorn, aiohttp, opentelemetry):
           # not prometheus_client, which reads the worker's PROMETHEUS_MULTIPROC_DIR when imported
           "bentoml_cli.cli", "_bentoml_impl.server.serving", "_bentoml_impl.server.app",
           "_bentoml_impl.worker.service", "opentelemetry.instrumentation.asgi")
ENV = {"OMP_NUM_THREADS": "1"}  # as every run in the suite (conftest sets torch's threads to 1 too)


def _differences(env: dict, zygote_env: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    return sorted(k for k in {*env, *zygote_env} if k.startswith(IMPORT_TIME_ENV) and not k.startswith(ignore)
                  and k not in SET_BY_TORCH and env.get(k) != zygote_env.get(k))


# --- the zygote ----------------------------------------------------------------------------------------------------

def _run_child(request: dict, fds: list[int], base_path: list[str]) -> None:
    """In the forked child: become the run the request describes, then exit as the interpreter would."""
    # The caller's descriptors at the numbers it had them (stdin, stdout, stderr; a stand-in's inherited ones, such
    # as the listening socket a bentoml worker is told the number of), moved out of the way first so that none is
    # overwritten before it is placed.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1024) for fd in fds]
    for fd in fds:
        os.close(fd)
    for target, fd in zip(request.get("fd_numbers", (0, 1, 2)), moved):
        os.dup2(fd, target)
        os.close(fd)
    if request.get("stand_in"):
        _end_with(request["stand_in"])
    if request.get("session"):  # as Popen's start_new_session: a signal to the caller's process group misses it
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request.get("unbuffered"):  # as `python -u`, which torchrun runs its workers with
        sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True,
                                      errors="backslashreplace")
    if request.get("launcher"):  # the run's own `[sys.executable, ...]` children are forked from here too
        sys.executable = request["launcher"]
    python_path = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    import numpy as np
    np.random.seed()  # a fresh interpreter draws numpy's global state from the OS; a fork would share the zygote's
    # The run's own __main__, as empty as a fresh interpreter's (this file's module stays what this function reads).
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    code = 0
    try:
        if request["mode"] == "-m":
            sys.argv = ["-m", *request["args"]]  # runpy puts the module's file in argv[0], as `python -m` does
            sys.path[:] = [os.getcwd(), *python_path, *base_path]
            runpy._run_module_as_main(request["target"], alter_argv=True)
        elif request["mode"] == "script":
            sys.argv = [request["target"], *request["args"]]
            sys.path[:] = [os.path.dirname(os.path.abspath(request["target"])), *python_path, *base_path]
            runpy.run_path(request["target"], run_name="__main__")
        else:
            sys.argv = ["-c", *request["args"]]
            sys.path[:] = ["", *python_path, *base_path]
            exec(compile(request["target"], "<string>", "exec"), vars(main))
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        kind, error, trace = sys.exc_info()
        sys.excepthook(kind, error, trace.tb_next)  # the traceback starts in the run's code, not here
        code = 1
    # What the interpreter does on its way out: join non-daemon threads, run atexit, flush the streams.
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


def _end_with(pid: int) -> None:
    """Be killed when the stand-in `pid` ends: whoever stops a run by its stand-in (circus, torchrun, a test's
    SIGKILL) must not leave the run itself going."""
    stand_in = os.pidfd_open(pid)

    def watch() -> None:
        select.select([stand_in], [], [])
        os.kill(os.getpid(), 9)

    threading.Thread(target=watch, daemon=True, name="t2d-stand-in-watch").start()


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 64)
    size = struct.unpack("!I", data[:4])[0]
    data = data[4:]
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the request ended early")
        data += chunk
    return json.loads(data), list(fds)


def _warm_up() -> None:
    """What every run of `python -m train` or `python -m export` pays first, paid once here: building an optimizer
    imports torch._dynamo, and the first ONNX export of a process imports torch.export and builds onnxscript's
    registry of torch ops (about 2 s of CPU each time). A throwaway export of a toy module, kept in memory."""
    import warnings

    import torch
    toy = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 1))
    # Silenced and forgotten: a warning shown here would be "already shown" in every run forked from us.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.optim.AdamW(toy.parameters())
        torch.onnx.export(toy.eval(), (torch.zeros(2, 1, 4, 4),), dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))


def serve(path: str) -> None:
    """Preload, listen on the Unix socket `path`, fork a run for each request; exit when stdin closes."""
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    _warm_up()
    if "prometheus_client" in sys.modules:  # its mode would be the zygote's, not each bentoml worker's
        raise RuntimeError("the zygote imported prometheus_client: forked bentoml workers would not share metrics")
    base_path = sys.path[1:]  # the interpreter's own entries: `Zygote` starts us without PYTHONPATH
    start_env = dict(os.environ)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}  # pid -> the caller's connection, told the exit status when it ends
    for_stand_ins: set[int] = set()  # the runs a stand-in asked for (torchrun's workers, bentoml's, bench children)
    stand_ins_cpu = 0.0
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 0.02)
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            # The pytest process that started us is gone; runs still going finish on their own.
            listener.close()
            shutil.rmtree(os.path.dirname(path))  # the folder `Zygote` made for the socket and the launcher
            return
        if listener in ready:
            conn, _ = listener.accept()
            request, fds = _receive(conn)
            differ = _differences(request["env"], start_env, ignore=TORCHRUN_SETS) if request.get("check") else []
            if differ:
                for fd in fds:
                    os.close(fd)
                conn.sendall(b"refused %s\n" % " ".join(differ).encode())
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in (conn, *waiting.values()):
                    other.close()
                _run_child(request, fds, base_path)
            for fd in fds:
                os.close(fd)
            conn.sendall(b"%d\n" % pid)
            waiting[pid] = conn
            if request.get("stand_in"):
                for_stand_ins.add(pid)
        while waiting:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid)
            if pid in for_stand_ins:  # nobody in the pytest process is told of these: a file tells the profiler
                for_stand_ins.discard(pid)
                stand_ins_cpu += usage.ru_utime + usage.ru_stime
                tmp = Path(path).with_name("stand_ins_cpu.tmp")
                tmp.write_text(f"{stand_ins_cpu:.3f}")
                os.replace(tmp, tmp.with_suffix(""))
            try:
                conn.sendall(b"%d %.3f\n" % (os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime))
            except OSError:
                pass  # the caller gave up (its timeout) and closed
            conn.close()


# --- the caller's side ---------------------------------------------------------------------------------------------

class Zygote:
    """One zygote process per pytest process, started on first use."""

    def __init__(self):
        # For profiling the suite (tests/cpu_profile.py): CPU seconds of the runs that ended (theirs and their
        # children's), in all and each with its command line; `cpu_s` adds the runs stand-ins asked for.
        self.own_cpu_s = 0.0
        self.runs: list[tuple[float, str]] = []
        self.dir = tempfile.mkdtemp(prefix="t2d-zygote-")
        self.path = os.path.join(self.dir, "socket")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # our packages stay out of the zygote
        self.env = {**env, **ENV}
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=self.env, cwd=self.dir)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"the test zygote did not start (exit {self.proc.wait()})")
        # What a run started with `fork_children` finds as sys.executable: `python ARGS` as the stand-in (`worker`).
        self.launcher = os.path.join(self.dir, "python")
        with open(self.launcher, "w") as f:
            f.write(f'#!/bin/sh\nexec "{sys.executable}" "{os.path.abspath(__file__)}" --worker "$@"\n')
        os.chmod(self.launcher, 0o755)

    @property
    def cpu_s(self) -> float:
        try:
            stand_ins = float(Path(self.dir, "stand_ins_cpu").read_text())
        except OSError:  # none has ended yet
            stand_ins = 0.0
        return self.own_cpu_s + stand_ins

    def differences(self, env: dict) -> list[str]:
        """The import-time variables that `env` sets differently from the zygote."""
        return _differences(env, self.env)

    def forkable(self, env: dict) -> bool:
        return not self.differences(env)

    def send(self, mode: str, target: str, args: list[str], cwd, env: dict, fds: list[int],
             session: bool = False, fork_children: bool = False) -> socket.socket:
        """Ask for a run with `fds` as its stdin, stdout and stderr (closed here once sent), in a session of its own
        with `session`, its `[sys.executable, ...]` children forked too with `fork_children`; the connection on which
        its pid and then its end are told."""
        request = {"mode": mode, "target": str(target), "args": [str(a) for a in args],
                   "cwd": str(Path(cwd).resolve()), "env": env, "session": session}
        if fork_children:
            request["launcher"] = self.launcher
            request["env"] = {**env, "T2D_ZYGOTE_SOCKET": self.path}
        try:
            return _send(self.path, request, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def run(self, mode: str, target: str, args: list[str], cwd, env: dict, timeout: float,
            input_fd: int | None = None, fork_children: bool = False) -> subprocess.CompletedProcess:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY) if input_fd is None else os.dup(input_fd)
        conn = self.send(mode, target, args, cwd, env, [stdin, out_w, err_w], fork_children=fork_children)
        reader = conn.makefile("rb")
        pid = int(reader.readline())
        deadline = time.monotonic() + timeout
        chunks = {out_r: [], err_r: []}
        open_fds = [out_r, err_r]
        try:
            while open_fds:
                left = deadline - time.monotonic()
                if left <= 0:
                    _kill(pid)
                    raise subprocess.TimeoutExpired([sys.executable, mode, target[:80], *args], timeout)
                for fd in select.select(open_fds, [], [], left)[0]:
                    chunk = os.read(fd, 1 << 16)
                    if chunk:
                        chunks[fd].append(chunk)
                    else:
                        open_fds.remove(fd)
            ended = reader.readline().split()
            if not ended:  # the zygote is gone: nobody will say how the run ended
                raise RuntimeError(f"the test zygote died while running {mode} {target[:80]}")
            status, self.own_cpu_s = int(ended[0]), self.own_cpu_s + float(ended[1])
            self.runs.append((float(ended[1]), " ".join([mode, target.splitlines()[0][:60], *args])))
        finally:
            for fd in (out_r, err_r):
                os.close(fd)
            reader.close()
            conn.close()
        shown = {"-m": [mode, target], "-c": [mode, "<code>"], "script": [target]}[mode]
        return subprocess.CompletedProcess([sys.executable, *shown, *args], status,
                                           b"".join(chunks[out_r]).decode(errors="replace"),
                                           b"".join(chunks[err_r]).decode(errors="replace"))


class Started:
    """A run forked from the zygote that goes on while the caller watches it: the part of subprocess.Popen the
    suite uses (pid, poll, wait, send_signal, and stderr as text where it was piped)."""

    def __init__(self, zygote: "Zygote", conn: socket.socket, pid: int, stderr_r: int | None, label: str):
        self.pid, self.returncode, self._zygote, self._conn, self._label = pid, None, zygote, conn, label
        self.stderr = None if stderr_r is None else open(stderr_r, errors="replace")

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._ended()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            self._ended()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def _ended(self) -> None:
        ended = _readline(self._conn).split()
        self._conn.close()
        if not ended:
            raise RuntimeError(f"the test zygote died while running {self.pid}")
        self.returncode, self._zygote.own_cpu_s = int(ended[0]), self._zygote.own_cpu_s + float(ended[1])
        self._zygote.runs.append((float(ended[1]), self._label))


def _send(path: str, request: dict, fds: list[int]) -> socket.socket:
    data = json.dumps(request).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [struct.pack("!I", len(data)) + data], fds)
    return conn


def _readline(conn: socket.socket) -> bytes:
    """One line, read a byte at a time: nothing after it is taken from the socket, so select still sees it."""
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return line


def start(argv: list[str], cwd, env: dict, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
          start_new_session: bool = False, fork_children: bool = False) -> "Started | subprocess.Popen":
    """`subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True,
    start_new_session=start_new_session)`, forked from the zygote when it can be (see `run`, and there
    `fork_children`). stdout: DEVNULL or an open file; stderr: PIPE, STDOUT or an open file."""
    env = dict(env)
    zygote = _for(argv, env)
    if zygote is None:
        return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True,
                                start_new_session=start_new_session)
    out = os.open(os.devnull, os.O_WRONLY) if stdout == subprocess.DEVNULL else os.dup(stdout.fileno())
    err_r = None
    if stderr == subprocess.PIPE:
        err_r, err = os.pipe()
    else:
        err = os.dup(out if stderr == subprocess.STDOUT else stderr.fileno())
    conn = zygote.send(*_split(argv), cwd, env, [os.open(os.devnull, os.O_RDONLY), out, err],
                       session=start_new_session, fork_children=fork_children)
    return Started(zygote, conn, int(_readline(conn)), err_r, " ".join(map(str, argv))[:200])


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


_zygote: Zygote | None = None
fallbacks: list[tuple[str, list[str]]] = []  # the runs that needed a process of their own, and why
_start_lock = threading.Lock()


def _started() -> Zygote | None:
    """This process's zygote, started on first use; None with T2D_TEST_FORK=0."""
    global _zygote
    if os.environ.get("T2D_TEST_FORK", "1") == "0":
        return None
    with _start_lock:
        if _zygote is None:
            _zygote = Zygote()
    return _zygote


def _for(argv: list[str], env: dict) -> Zygote | None:
    """The zygote to fork `argv` from with `env`; None where it needs a real process (recorded in `fallbacks`)."""
    zygote = _started()
    if zygote is not None and not zygote.forkable(env):
        fallbacks.append((" ".join(map(str, argv))[:200], zygote.differences(env)))
        return None
    return zygote


def _split(argv: list[str]) -> tuple[str, str, list[str]]:
    """["-m", MODULE, *args], ["-c", CODE, *args] or [SCRIPT, *args] -> (mode, target, args)."""
    return (argv[0], argv[1], argv[2:]) if argv[0] in ("-m", "-c") else ("script", str(argv[0]), argv[1:])


def torchrun_workers(env: dict) -> list[str] | None:
    """The arguments after `torchrun ... --no-python` that fork each worker from the zygote, with `env` changed to
    tell them where it is; None where runs are not forked."""
    zygote = _started()
    if zygote is None:
        return None
    env["T2D_ZYGOTE_SOCKET"] = zygote.path
    return [zygote.launcher]


def run(argv: list[str], cwd, env: dict | None = None, timeout: float = 300,
        fork_children: bool = False) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)`,
    where argv is `["-m", MODULE, *args]`, `["-c", CODE, *args]` or `[SCRIPT, *args]`: forked from the zygote when it
    can be. `fork_children`: the run's own `python` children (`[sys.executable, ...]`) are forked as well, each
    through a stand-in process (`worker`); for a script whose children's imports are not what it measures."""
    env = dict(os.environ if env is None else env)
    zygote = _for(argv, env)
    if zygote is not None:
        return zygote.run(*_split(argv), cwd, env, timeout, fork_children=fork_children)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# --- a stand-in for a forked run ----------------------------------------------------------------------------------

def worker() -> None:
    """`python tests/zygote.py --worker ARGS` (`-m MODULE`, `-c CODE` or `SCRIPT`, then its arguments), started with
    T2D_ZYGOTE_SOCKET set: by `torchrun --no-python` for each worker, or as sys.executable by a run forked with
    `fork_children`. The run is forked from that zygote instead of a fresh interpreter importing torch. This process
    (which imports nothing heavy) stands in for it: its stdin, stdout, stderr and environment (torchrun's rank
    variables) are the run's, the signals sent to it are passed on, and it exits as the run did. Where the
    environment differs from the zygote's in an import-time variable, it becomes `python -u ARGS` itself."""
    import signal

    argv = sys.argv[2:]
    mode, target, args = _split(argv)
    numbers = [0, 1, 2, *_inherited()]
    conn = _send(os.environ["T2D_ZYGOTE_SOCKET"], {"mode": mode, "target": target, "args": args, "cwd": os.getcwd(),
                                                   "env": dict(os.environ), "check": True, "unbuffered": True,
                                                   "fd_numbers": numbers, "stand_in": os.getpid()}, numbers)
    reader = conn.makefile("rb")
    first = reader.readline().split()
    if first[0] == b"refused":
        os.execv(sys.executable, [sys.executable, "-u", *argv])
    pid = int(first[0])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda number, frame: os.kill(pid, number))
    ended = reader.readline().split()
    status = int(ended[0]) if ended else 1
    if status < 0:  # ended by a signal: end the same way, as the caller would see the run itself end
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status)


def _inherited() -> list[int]:
    """The descriptors above 2 this process was started with (a bentoml worker's listening socket, say)."""
    listed = [int(name) for name in os.listdir("/proc/self/fd") if int(name) > 2]
    found = []
    for fd in listed:  # one of them was the listing's own, closed by now
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.append(fd)
    return found


if __name__ == "__main__":
    worker() if sys.argv[1] == "--worker" else serve(sys.argv[1])
