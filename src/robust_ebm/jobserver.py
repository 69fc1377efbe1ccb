"""A warm process for the workflow's many short jobs: it imports torch, MLflow and the stages once, then
forks one child per `robust-ebm` command, so a job starts in tens of milliseconds instead of ~4 CPU-s.

    server = start()             # the Snakefile's onstart: `robust-ebm serve` in the background, and
                                 # ROBUST_EBM_JOBSERVER=<its socket> in the environment the jobs inherit
    ... each job runs `robust-ebm <stage> ...`: cli.main sees the variable and hands its argv, working
        directory, environment and stdin/stdout/stderr to the server (`submit`); the server forks a
        child that runs the command exactly as a fresh process would, and returns its exit status
    server.stop()                # onsuccess / onerror (`stop([server])`)

A child is the same program as a fresh process: same argv, cwd, environment and standard streams; it
sets its own seeds, logging and MLflow run as every job does, and takes its thread count from the
job's OMP_NUM_THREADS. The server itself never opens an MLflow store, initialises CUDA, starts a
thread or runs a torch operation, since none of those is safe across fork (tests/test_jobserver.py).
Ctrl-C or SIGTERM to a job is passed on to its child; a job whose client dies is terminated. A job
from another interpreter or environment, or after a package file changed since the server imported
it, is refused and runs in its own process (it says so in one line).
Linux only (fork and SCM_RIGHTS); elsewhere, or with ROBUST_EBM_JOBSERVER=off, every command runs in
its own process as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ENV = "ROBUST_EBM_JOBSERVER"
OFF = "off"
# What every stage imports at start-up (CPU-s each, docs/measurements.md "Start-up cost of a job").
PRELOAD = ("torch", "numpy", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
           "robust_ebm.tracking", "robust_ebm.prepare", "robust_ebm.train", "robust_ebm.evaluate",
           "robust_ebm.generate", "robust_ebm.metrics.stage", "robust_ebm.claims", "robust_ebm.tables")
_HEADER = struct.Struct("!I")  # length of the JSON request that follows


class JobServerError(RuntimeError):
    """The job server named by ROBUST_EBM_JOBSERVER cannot be reached or started."""


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds")


# --------------------------------------------------------------------------- client (one per job)


def requested() -> str | None:
    """The socket path when commands should go to a job server, else None."""
    path = os.environ.get(ENV, "")
    return path if path and path != OFF and supported() else None


def submit(argv: list[str], socket_path: str) -> int | None:
    """Run `robust-ebm argv` in a child of the server; pass on SIGINT/SIGTERM; return its exit status.
    None (with a note on stderr) when this job cannot use the server: no server on this host (a cluster
    job), or a server of another Python or robust_ebm (a job in its own conda environment)."""
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), **_identity()}).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
    except OSError as err:
        print(f"robust-ebm: no job server at {ENV}={socket_path} on this host ({err.strerror}); "
              "running in this process", file=sys.stderr)
        return None
    with conn:
        socket.send_fds(conn, [_HEADER.pack(len(request)) + request], [0, 1, 2])
        reader = conn.makefile("r")
        answer = reader.readline().split(maxsplit=1)
        if answer[:1] == ["refused"]:
            print(f"robust-ebm: the job server at {socket_path} {answer[1].strip()}; running in this process",
                  file=sys.stderr)
            return None
        if len(answer) != 2 or answer[0] != "pid":
            raise JobServerError(f"the job server broke off (expected its child's pid, got {' '.join(answer) or 'nothing'})")
        pid = int(answer[1])
        forward = lambda signum, frame: _kill(pid, signum)  # noqa: E731
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return int(_expect(reader, "exit"))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _expect(reader, word: str) -> str:
    line = reader.readline().split()
    if len(line) != 2 or line[0] != word:
        raise JobServerError(f"the job server broke off (expected '{word}', got {' '.join(line) or 'nothing'})")
    return line[1]


def _identity() -> dict:
    """What must be equal in client and server for a child to run the client's code: the interpreter,
    the environment, the package, and its source files as they are now (a file edited after the
    server imported it would otherwise run in its old version)."""
    package = Path(__file__).resolve().parent
    stamps = sorted((str(p.relative_to(package)), p.stat().st_mtime_ns, p.stat().st_size) for p in package.rglob("*.py"))
    return {"executable": os.path.realpath(sys.executable), "environment": sys.prefix, "package": str(package),
            "code": hashlib.sha256(repr(stamps).encode()).hexdigest()}


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- server


def serve(socket_path: str, command, *, ready_fd: int | None = None) -> None:
    """Preload, listen on `socket_path`, fork a child per request until SIGTERM/SIGINT; a child runs
    `command(argv) -> exit status` (cli.run)."""
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    own = _identity()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    listener.settimeout(0.05)  # how often finished children are collected
    running: dict[int, socket.socket] = {}  # child pid -> its client's connection
    stopping = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stopping.append(signum))
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    parent = os.getppid()
    try:
        while not stopping and os.getppid() == parent:  # a workflow killed without onerror: go too
            _collect(running)
            try:
                conn, _ = listener.accept()
            except (TimeoutError, InterruptedError):
                continue
            conn.settimeout(None)
            request, fds = _receive(conn)
            mismatch = [k for k, v in own.items() if request.get(k) != v]
            if mismatch:
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"refused runs another {' and '.join(mismatch)} ({own})\n".encode())
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in running.values():
                    other.close()
                _child(conn, request, fds, command)  # never returns
            for fd in fds:
                os.close(fd)
            conn.sendall(f"pid {pid}\n".encode())
            running[pid] = conn
    finally:
        for pid in running:
            _kill(pid, signal.SIGTERM)
        while running:
            _collect(running, block=True)
        listener.close()
        Path(socket_path).unlink(missing_ok=True)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < _HEADER.size:
        data += conn.recv(1 << 16)
    (size,) = _HEADER.unpack_from(data)
    while len(data) < _HEADER.size + size:
        data += conn.recv(1 << 16)
    return json.loads(data[_HEADER.size:_HEADER.size + size]), list(fds)


def _collect(running: dict[int, socket.socket], *, block: bool = False) -> None:
    """Send each finished child's exit status to its client; end children whose client went away."""
    while running:
        pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        if pid == 0:
            break
        conn = running.pop(pid, None)
        if conn is not None:
            code = os.waitstatus_to_exitcode(status)
            try:
                conn.sendall(f"exit {code if code >= 0 else 128 - code}\n".encode())
            except OSError:
                pass
            conn.close()
        if block:
            return
    for pid, conn in list(running.items()):
        conn.setblocking(False)
        try:
            gone = conn.recv(1) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        conn.setblocking(True)
        if gone:
            _kill(pid, signal.SIGTERM)


def _child(conn: socket.socket, request: dict, fds: list[int], command) -> None:
    """Become the job: its streams, cwd, environment and threads; run the command; exit with its status."""
    import atexit
    import io
    import traceback

    code = 1
    try:
        conn.close()
        for s in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False))
        sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=os.isatty(1))
        sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _threads_from_environment()
        sys.argv = ["robust-ebm", *request["argv"]]
        code = command(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - as the interpreter would: traceback, status 1
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _threads_from_environment() -> None:
    """torch read OMP_NUM_THREADS when the server imported it; apply the job's own value."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        import torch

        torch.set_num_threads(int(value))


# --------------------------------------------------------------------------- the workflow's handle


class Server:
    """A `robust-ebm serve` process started for one workflow run."""

    def __init__(self, process: subprocess.Popen, socket_path: str):
        self.process, self.socket_path = process, socket_path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.environ.pop(ENV, None)
        Path(self.socket_path).unlink(missing_ok=True)
        Path(self.socket_path).parent.rmdir()


def stop(servers: list) -> None:
    """Stop every server in `servers` (None entries are skipped) and empty the list."""
    while servers:
        server = servers.pop()
        if server is not None:
            server.stop()


def start(*, timeout: float = 120.0) -> Server | None:
    """Start a server and point this process's environment (inherited by the jobs) at it.
    None when jobs should run in their own processes (not Linux, or ROBUST_EBM_JOBSERVER=off)."""
    if os.environ.get(ENV) == OFF or not supported():
        return None
    where = tempfile.gettempdir()
    if len(where) > 64 and os.path.isdir("/tmp"):  # a Unix socket path has at most 107 bytes
        where = "/tmp"
    socket_path = str(Path(tempfile.mkdtemp(prefix="robust-ebm-", dir=where)) / "jobs.sock")
    read_end, write_end = os.pipe()
    # its own session: Ctrl-C reaches a child through its job's client only (which passes it on)
    process = subprocess.Popen([sys.executable, "-m", "robust_ebm", "serve", "--socket", socket_path,
                                "--ready-fd", str(write_end)], pass_fds=(write_end,), start_new_session=True)
    os.close(write_end)
    with os.fdopen(read_end) as ready:
        answer = ready.readline() if select.select([ready], [], [], timeout)[0] else ""  # "" also when it died
    if answer.strip() != "ready":
        process.kill()
        process.wait()
        Path(socket_path).parent.rmdir()
        raise JobServerError(f"`robust-ebm serve` did not start within {timeout:.0f} s (exit status "
                             f"{process.returncode}); set {ENV}={OFF} to run every job in its own process")
    os.environ[ENV] = socket_path
    return Server(process, socket_path)
