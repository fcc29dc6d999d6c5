"""Start, watch and stop one local server process, with a pid file and a log file.

A :class:`ServerProcess` owns exactly the process it started: ``stop`` signals that
pid only, and a pid file lets another command (``python -m qlm.localstack down``)
find it again. A pid file is trusted only while the process behind it still has
the command line it was started with, so a recycled pid is never signalled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from qlm.core.errors import Unavailable


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Startable(Protocol):
    def start(self) -> object: ...


T = TypeVar("T", bound=Startable)


def start_on_free_ports(make: Callable[[], T], num_attempts: int = 3) -> T:
    """``make()`` a server on freshly chosen free ports and start it; when a port was
    taken between choosing and binding, try again. Raises the last Unavailable."""
    for attempt in range(1, num_attempts + 1):
        server = make()
        try:
            server.start()
            return server
        except Unavailable:
            if attempt == num_attempts:
                raise
    raise AssertionError("unreachable")


def port_is_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def tail(path: Path, num_lines: int = 30) -> str:
    """The last lines of a log file, for error messages ('' when it does not exist)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-num_lines:])


#: One long-lived thread that forks servers which must die with this process.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlm-spawner")


def _terminate_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent thread exits."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class PortTaken(Unavailable):
    """Something else listens on a port a server was to bind (``port``)."""

    def __init__(self, message: str, port: int) -> None:
        super().__init__(message)
        self.port = port


def ensure_port_free(host: str, port: int, what: str) -> None:
    """Raise PortTaken when something already listens on ``host:port``."""
    if port_is_open(host, port):
        raise PortTaken(f"{what}: port {port} on {host} is already in use", port)


def _cmdline_of(pid: int) -> str | None:
    """The command line of a live process, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped) is not alive for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class ServerProcess:
    """One server process: ``name.pid`` and ``name.log`` live in ``run_dir``.

    ``marker`` is a string that must appear in the process's command line (the
    data directory, say) for a pid file to be believed.
    """

    def __init__(self, name: str, run_dir: Path, marker: str) -> None:
        self.name = name
        self.run_dir = run_dir
        self.marker = marker
        self.pid_path = run_dir / f"{name}.pid"
        self.log_path = run_dir / f"{name}.log"
        self._popen: subprocess.Popen[bytes] | None = None

    def start(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> int:
        """Start ``argv`` in its own session; returns the pid.

        The process outlives the caller unless ``die_with_parent`` (Linux: it gets
        SIGTERM when the calling thread exits, so a killed test run leaves no server).
        Raises Unavailable when a live process from an earlier start is still running.
        """
        existing = self.running_pid()
        if existing is not None:
            raise Unavailable(f"{self.name} already runs as pid {existing} ({self.pid_path})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:

            def popen() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_terminate_with_parent if die_with_parent else None,
                )

            # The death signal follows the thread that forked, so fork from one that
            # lives as long as this process (a caller's short-lived thread would not).
            popened = _SPAWNER.submit(popen).result() if die_with_parent else popen()
        self._popen = popened
        self.pid_path.write_text(f"{popened.pid}\n")
        return popened.pid

    def running_pid(self) -> int | None:
        """The pid from the pid file if that process is alive and is ours, else None."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        if self._popen is not None and self._popen.pid == pid:
            return pid if self._popen.poll() is None else None
        cmdline = _cmdline_of(pid)
        if cmdline is None or self.marker not in cmdline or not _pid_is_alive(pid):
            return None
        return pid

    def exited_with(self) -> int | None:
        """The exit status when this object started the process and it has exited."""
        return None if self._popen is None else self._popen.poll()

    def wait_until(
        self, ready: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1
    ) -> float:
        """Poll ``ready`` until it is true; returns the seconds waited.

        Raises Unavailable (with the log's tail) when the process exits or the time runs out.
        """
        started_at = time.monotonic()
        deadline = started_at + timeout_s
        while True:
            if ready():
                return time.monotonic() - started_at
            status = self.exited_with()
            if status is not None:
                raise Unavailable(
                    f"{self.name} exited with status {status} before {what}; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"{self.name}: no {what} within {timeout_s:.0f} s; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            time.sleep(poll_s)

    def stop(self, timeout_s: float = 20.0, kill: bool = False) -> bool:
        """Stop the process: SIGTERM (or SIGKILL when ``kill``), SIGKILL after ``timeout_s``.

        Returns True when a process was stopped, False when none was running.
        The pid file is removed either way.
        """
        pid = self.running_pid()
        if pid is None:
            self._forget()
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        if not self._wait_gone(pid, timeout_s):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, 5.0)
        self._forget()
        return True

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._popen is not None and self._popen.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._popen.wait(timeout=0.1)
                    return True
            elif not _pid_is_alive(pid):
                return True
            else:
                time.sleep(0.1)
        return False

    def _forget(self) -> None:
        self.pid_path.unlink(missing_ok=True)
        self._popen = None


def load_or_create_passwords(path: Path, users: Iterable[str]) -> dict[str, str]:
    """The passwords recorded in ``path`` (JSON ``{user: password}``), else a new random
    one per user, written there readable by its owner only (0600)."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    passwords = {name: secrets.token_urlsafe(24) for name in users}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(passwords, handle)
    return passwords
