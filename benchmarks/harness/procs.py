"""Child processes for the harness: start, wait until ready, stop by PID.

Every real component the harness runs (docker-registry, containerd, later p2pd and supernode)
goes through :class:`Process`, so the rules live in one place:

* stdout and stderr go to one log file, never to a pipe (a pipe nobody reads fills up and
  blocks the child), and the log's tail is quoted in every error so a failed start explains
  itself;
* every wait has a deadline (:func:`wait_for`); nothing polls forever;
* a process is stopped by its own PID (SIGTERM, then SIGKILL after a grace period) and always
  reaped, also when the code that started it fails: use it as a context manager.

:func:`free_port` asks the kernel for a free loopback port. Another process may take the port
between this call and the child's ``bind``; callers that care retry the start (see
``Registry``), which is simpler and more honest than pretending the race does not exist.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

LOOPBACK = "127.0.0.1"


class Managed:
    """A component with ``start()``/``stop()`` that is also a context manager: started on
    entry, stopped on exit (also when the block fails)."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class HarnessError(RuntimeError):
    """A harness component could not be started, reached or driven."""


class MissingBinaryError(HarnessError):
    """A program the harness needs is not installed (CI installs it: see .ci/run)."""


def require_binary(name: str) -> str:
    """The absolute path of program ``name``, or a clear error naming the Debian package."""
    path = shutil.which(name)
    if path is None:
        raise MissingBinaryError(
            f"{name!r} is not on PATH; install it (Debian: apt-get install -y "
            f"{_DEBIAN_PACKAGES.get(name, name)}). The CI script installs it."
        )
    return path


_DEBIAN_PACKAGES = {
    "docker-registry": "docker-registry",
    "containerd": "containerd",
    "ctr": "containerd",
    "skopeo": "skopeo",
    "podman": "podman",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.02,
    on_timeout: Callable[[], str] | None = None,
) -> None:
    """Poll ``predicate`` until it is true; raise :class:`HarnessError` after ``timeout`` s.

    ``on_timeout`` may add detail to the error (a log tail, the last response seen).
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            detail = on_timeout() if on_timeout is not None else ""
            raise HarnessError(f"timed out after {timeout:.1f} s waiting for {what}{detail}")
        time.sleep(interval)


def http_responds(url: str, *, statuses: Sequence[int] = (200,)) -> Callable[[], bool]:
    """A predicate: ``GET url`` answers with one of ``statuses`` (errors count as "not yet")."""

    def check() -> bool:
        try:
            response = httpx.get(url, timeout=1.0)
        except httpx.HTTPError:
            return False
        return response.status_code in statuses

    return check


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Process(Managed):
    """One child process with its log file; stopped and reaped on exit from ``with``.

    ``name`` appears in error messages. The log is appended to, so a process that is
    stopped and started again (an outage in a test) keeps its earlier lines.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise HarnessError(f"{self.name} is not started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running (or before start); the exit status once it has exited."""
        return None if self._popen is None else self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        if self._popen is not None:
            raise HarnessError(f"{self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        try:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                # Its own session: a Ctrl-C in the terminal running the tests reaches only us,
                # and we stop the child ourselves (by PID) on the way out.
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            self._log = None
            raise

    def wait_ready(self, predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Wait until ``predicate`` holds; fail early if the process exits meanwhile."""

        def ready_or_dead() -> bool:
            if not self.running:
                raise HarnessError(
                    f"{self.name} exited with status {self.returncode} before {what}"
                    f"{self.describe_log()}"
                )
            return predicate()

        wait_for(
            ready_or_dead,
            timeout=timeout,
            what=f"{self.name}: {what}",
            on_timeout=self.describe_log,
        )

    def describe_log(self, lines: int = 30) -> str:
        """The log's tail formatted for an error message."""
        text = tail(self.log_path, lines)
        if not text:
            return f" (log {self.log_path} is empty)"
        return f"\n--- last lines of {self.log_path} ---\n{text}"

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` s; always reaps. Returns the exit status."""
        popen, self._popen = self._popen, None
        try:
            if popen is None:
                return None
            if popen.poll() is None:
                _signal(popen.pid, signal.SIGTERM)
                try:
                    popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    _signal(popen.pid, signal.SIGKILL)
                    popen.wait(timeout=10)
            return popen.returncode
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


def _signal(pid: int, sig: signal.Signals) -> None:
    # Only the child's own PID: never its group or anything found by name.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    what: str,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived command with a deadline; on failure, raise with its output.

    On timeout the child is killed (``subprocess.run`` does that) and the error says so.
    """
    try:
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        out = _text(e.stdout) + _text(e.stderr)
        raise HarnessError(f"{what}: timed out after {timeout:.0f} s\n{out[-4000:]}") from e
    if check and result.returncode != 0:
        raise HarnessError(
            f"{what}: exit status {result.returncode}\n$ {' '.join(argv)}\n"
            f"{(result.stdout + result.stderr)[-4000:]}"
        )
    return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")
