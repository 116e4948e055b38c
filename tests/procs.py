"""Real processes for the reliability tests: ``tsptq serve --api-only`` and ``tsptq worker``
subprocesses, each in a session of its own, the means to kill them (or one of their
descendants, such as a Ray actor), a TCP proxy that can cut a database off, and a temporary
PostgreSQL database.

Everything killed here was started here: a process is found by its session (the subprocess's
own) or by its ancestry (a descendant of a subprocess or of this test process), never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
from db_fixtures import pg_database

from service.demo import free_port

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

__all__ = ["REPO", "Proc", "TcpProxy", "app_in_thread", "free_port", "pg_database", "service_env",
           "wait_for"]


def service_env(tmp: Path, db_url: str, **settings: Any) -> dict[str, str]:
    """The environment of a service process: ``TSPTQ_*`` from ``settings`` (e.g.
    ``heartbeat_s=0.3``), no token and no Ray cluster unless given, offline, one torch
    thread."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TSPTQ_") and k != "RAY_ADDRESS"}
    # One torch thread, as the test process has (conftest): on a busy machine more threads
    # than free cores make every calibration many times slower.
    env.update({"TSPTQ_DATA_DIR": str(tmp / "data"), "TSPTQ_DATABASE_URL": db_url,
                "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update({f"TSPTQ_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def wait_for(predicate: Callable[[], T], timeout: float, what: str,
             interval: float = 0.1) -> T:
    """``predicate()`` once it is truthy; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def app_in_thread(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a daemon thread on a free loopback port: its base URL, once
    ``/healthz`` answers 200; stopped afterwards."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.config.port}"

    def up() -> bool:
        assert thread.is_alive(), "the test server stopped"
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 30, "the test server", interval=0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- processes ----------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[3])  # state ppid pgrp session ...


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def title(pid: int) -> str:
    """The process's command line as it shows it (Ray workers set theirs: ``ray::Class.method``
    while a method runs); '' if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """Every living process below ``root``."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def session_members(sid: int) -> list[int]:
    return [pid for pid in _pids() if (st := _stat(pid)) is not None and st[1] == sid]


def alive(pid: int) -> bool:
    st = _stat(pid)
    if st is None:
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)
    except OSError:
        return False


class Proc:
    """``python -m service.cli ARGS`` in a new session, its output in ``log``."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.log = args, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.popen = subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=env,
                                          cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        self.pid = self.popen.pid

    @classmethod
    def api(cls, port: int, env: dict[str, str], log: Path) -> Proc:
        return cls(["serve", "--api-only", "--port", str(port), "--log-level", "warning"],
                   env, log)

    @classmethod
    def worker(cls, env: dict[str, str], log: Path, poll: float = 0.2) -> Proc:
        return cls(["worker", "--poll", str(poll), "--log-level", "info"], env, log)

    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL this process alone (what its children do then is up to them)."""
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; then SIGKILL whatever is left of its
        session (Ray's processes)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=30)
        self.sweep()

    def sweep(self, timeout: float = 30) -> None:
        """SIGKILL every process left in this process's session, and wait until none is."""
        deadline = time.monotonic() + timeout
        while members := [p for p in session_members(self.pid) if alive(p)]:
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise AssertionError(f"processes {members} of session {self.pid} survive")
            time.sleep(0.1)


def wait_healthy(url: str, proc: Proc, timeout: float = 120) -> None:
    def up() -> bool:
        if not proc.running():
            raise AssertionError(f"{proc.args[0]} exited ({proc.popen.returncode}):\n"
                                 f"{proc.output()[-3000:]}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout, f"{url}/healthz", interval=0.2)


# -- a database that can be cut off -------------------------------------------------------------


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target``. ``cut()`` closes every connection and the
    listening socket, so that new connections are refused; ``restore()`` listens again on the
    same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.connections = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener, self._stop = listener, threading.Event()
        self._thread = threading.Thread(target=self._accept, args=(listener, self._stop),
                                        daemon=True, name="tcp-proxy")
        self._thread.start()
        return self

    restore = start

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    close = cut
