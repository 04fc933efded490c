"""Real container clients pulling through a mirror: containerd (ctr), skopeo and podman.

Each client is told that a registry *name* (say ``example.test``) lives at the real registry
(``http://127.0.0.1:PORT``), optionally behind a mirror (p2pd), through its own config file:
``hosts.toml`` for containerd (:func:`write_hosts_toml`), ``registries.conf`` for skopeo and
podman (:func:`write_registries_conf`). Image references then use the name:
``example.test/library/app:v1``.

What these clients do that tests must know (containerd 1.6.20, skopeo 1.9, podman 4.3):

* **They fall back silently.** When the mirror errors, containerd tries ``server`` and skopeo
  and podman try the registry's ``location``; the pull succeeds anyway. A test of the mirror
  must check where the bytes came from (``Registry.blob_gets``), or pass
  ``fallback=False`` to :func:`write_hosts_toml`.
* **A broken config leaks to the real network.** containerd ignores a hosts.toml it cannot
  parse (a file with ``server`` but no ``[host]`` table is one: "invalid `host` tree") and
  then resolves the name itself (``https://example.test``, a DNS query leaving the machine).
  So :func:`write_hosts_toml` always writes a ``[host]`` table, and :meth:`Containerd.pull`
  refuses to run unless the hosts directory has a valid hosts.toml for the reference's host.
* containerd adds ``?ns=<name>`` to every request to a host other than the reference's own
  (the mirror, and ``server`` too when it is the remapped upstream), sends ``Accept``
  as one comma-joined header, and with ``--user`` first tries the token server's OAuth2
  ``POST`` before the classic ``GET``. skopeo and podman send ``Accept`` as six separate header
  lines and try TLS first on an ``insecure`` host, then plain HTTP.
* **skopeo and podman drop ``--creds`` for a remapped registry**: those credentials go only to
  the reference's own host (``example.test``); a different location or mirror gets the
  credentials stored for its real ``host:port`` in an auth file, or none. So ``creds`` here
  are written into an auth file for every endpoint (:func:`registry_endpoints`).
* containerd's content store is shared across namespaces: a second pull of the same image
  fetches nothing. For a cold pull, use a fresh :class:`Containerd` or call
  :meth:`Containerd.reset` (a restart takes ≈0.2 s).
* ``ctr images pull`` fetches in the ``ctr`` process, not in the daemon, so prefixing the
  command (``command_prefix=["ip", "netns", "exec", "h1"]``) pulls from inside a network
  namespace while containerd runs in the root namespace.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness.procs import HarnessError, Managed, Process, require_binary, run
from benchmarks.harness.regauth import Credentials

# A loopback port nothing listens on (a privileged one, so no test server can take it):
# the "upstream" of a hosts.toml written with fallback=False.
DEAD_UPSTREAM = "http://127.0.0.1:1"


@dataclass(frozen=True)
class PullResult:
    """A finished pull: which client, what, how long (wall clock) and what it printed."""

    client: str
    ref: str
    seconds: float
    output: str


def reference_host(ref: str) -> str:
    """The registry host of an image reference, as docker and containerd read it."""
    first, sep, _ = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


# -- containerd ---------------------------------------------------------------------------------


def write_hosts_toml(
    hosts_dir: Path,
    registry_host: str,
    upstream_url: str,
    mirror_url: str | None = None,
    *,
    fallback: bool = True,
) -> Path:
    """Write ``hosts_dir/<registry_host>/hosts.toml``; returns its path.

    Without a mirror, the upstream is the only host. With one, containerd asks the mirror
    first (capabilities pull and resolve) and falls back to ``server`` (the upstream) when the
    mirror fails, unless ``fallback`` is False: then ``server`` is :data:`DEAD_UPSTREAM`, so a
    failing mirror fails the pull instead of being hidden.
    """
    server = upstream_url if fallback or mirror_url is None else DEAD_UPSTREAM
    first_host = mirror_url if mirror_url is not None else upstream_url
    text = (
        f"server = {json.dumps(server)}\n"
        f"\n"
        f"[host.{json.dumps(first_host)}]\n"
        f'  capabilities = ["pull", "resolve"]\n'
    )
    path = hosts_dir / registry_host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def check_hosts_dir(hosts_dir: Path, ref: str) -> None:
    """Refuse a pull that containerd would send to the real network (see the module doc)."""
    host = reference_host(ref)
    path = hosts_dir / host / "hosts.toml"
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise HarnessError(
            f"no {path}: containerd would resolve {host!r} itself; write one with "
            f"write_hosts_toml()"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise HarnessError(f"{path} is not valid TOML: {e}") from e
    if not isinstance(config.get("host"), dict) or not config["host"]:
        raise HarnessError(
            f"{path} has no [host.…] table; containerd 1.6 rejects such a file and falls back "
            f"to https://{host}"
        )


class Containerd(Managed):
    """A private containerd daemon (CRI off) with root, state and sockets of its own.

    ``workdir`` holds ``config.toml``, ``root/``, ``state/`` and ``containerd.log``; the
    sockets live in a short directory under the system temp dir, because a unix socket path
    must fit in 108 bytes and pytest's temp paths can be longer.
    """

    def __init__(self, workdir: Path, *, startup_timeout: float = 15.0) -> None:
        self.workdir = workdir
        self.startup_timeout = startup_timeout
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "containerd.log"
        self._socket_dir: Path | None = None
        self._process: Process | None = None

    @property
    def socket(self) -> Path:
        if self._socket_dir is None:
            raise HarnessError("containerd is not running")
        return self._socket_dir / "containerd.sock"

    def start(self) -> None:
        binary = require_binary("containerd")
        require_binary("ctr")
        if self._process is not None:
            raise HarnessError("containerd already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._socket_dir = Path(tempfile.mkdtemp(prefix="harness-ctd-"))
        try:
            self.config_path.write_text(
                "version = 2\n"
                f"root = {json.dumps(str(self.root))}\n"
                f"state = {json.dumps(str(self.state))}\n"
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                "[grpc]\n"
                f"  address = {json.dumps(str(self.socket))}\n"
                "[ttrpc]\n"
                f"  address = {json.dumps(str(self.socket) + '.ttrpc')}\n"
                "[metrics]\n"
                '  address = ""\n'
            )
            self._process = Process(
                "containerd", [binary, "--config", str(self.config_path)], log_path=self.log_path
            )
            self._process.start()
            self._process.wait_ready(
                self._socket_accepts, timeout=self.startup_timeout, what=f"socket {self.socket}"
            )
        except BaseException:
            self.stop()
            raise

    def _socket_accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        process, self._process = self._process, None
        socket_dir, self._socket_dir = self._socket_dir, None
        try:
            if process is not None:
                process.stop()
        finally:
            if socket_dir is not None:
                shutil.rmtree(socket_dir, ignore_errors=True)

    def reset(self) -> None:
        """Stop, delete every image and blob (root and state), start again: next pull is cold."""
        self.stop()
        # Errors are not ignored: a half-deleted root would make the next pull lukewarm.
        for path in (self.root, self.state):
            if path.exists():
                shutil.rmtree(path)
        self.start()

    def ctr(self, *args: str, namespace: str = "harness", timeout: float = 60.0) -> str:
        """Run ``ctr --address SOCK -n NS ARGS…``; returns its stdout."""
        argv = [require_binary("ctr"), "--address", str(self.socket), "-n", namespace, *args]
        return run(argv, timeout=timeout, what=f"ctr {' '.join(args)}").stdout

    def pull(
        self,
        ref: str,
        *,
        hosts_dir: Path,
        user: Credentials | None = None,
        namespace: str = "harness",
        timeout: float = 300.0,
        command_prefix: Sequence[str] = (),
    ) -> PullResult:
        """``ctr images pull --hosts-dir HOSTS [--user u:p] REF`` (fetch and unpack).

        No ``--plain-http`` is needed: the ``http://`` in hosts.toml decides the scheme.
        Raises :class:`HarnessError` with ctr's output and the daemon's log tail on failure.
        """
        check_hosts_dir(hosts_dir, ref)
        args = ["images", "pull", "--hosts-dir", str(hosts_dir)]
        if user is not None:
            args += ["--user", f"{user[0]}:{user[1]}"]
        argv = [
            *command_prefix,
            require_binary("ctr"),
            "--address",
            str(self.socket),
            "-n",
            namespace,
            *args,
            ref,
        ]
        started = time.monotonic()
        result = run(argv, timeout=timeout, what=f"ctr pull {ref}", check=False)
        seconds = time.monotonic() - started
        output = result.stdout + result.stderr
        if result.returncode != 0:
            detail = self._process.describe_log() if self._process is not None else ""
            raise HarnessError(
                f"ctr pull {ref} failed (status {result.returncode}):\n{output[-4000:]}{detail}"
            )
        return PullResult("containerd", ref, seconds, output)

    def image_names(self, namespace: str = "harness") -> list[str]:
        return self.ctr("images", "ls", "-q", namespace=namespace).split()


# -- skopeo and podman --------------------------------------------------------------------------


def write_registries_conf(
    path: Path, prefix: str, location: str, mirror: str | None = None
) -> Path:
    """A containers-registries.conf v2 file mapping ``prefix`` to ``location`` (host:port).

    With ``mirror`` (host:port), skopeo and podman try it first and fall back to
    ``location`` when it fails. Both are ``insecure`` (plain HTTP allowed).
    """
    lines = [
        "unqualified-search-registries = []",
        "",
        "[[registry]]",
        f"prefix = {json.dumps(prefix)}",
        f"location = {json.dumps(location)}",
        "insecure = true",
    ]
    if mirror is not None:
        lines += ["", "[[registry.mirror]]", f"location = {json.dumps(mirror)}", "insecure = true"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def registry_endpoints(registries_conf: Path, ref: str) -> list[str]:
    """The hosts skopeo/podman may contact for ``ref``: its mirrors, then its location.

    Raises :class:`HarnessError` if the file does not map the reference's host: the client
    would then go to the real network.
    """
    host = reference_host(ref)
    try:
        config = tomllib.loads(registries_conf.read_text())
    except (FileNotFoundError, tomllib.TOMLDecodeError) as e:
        raise HarnessError(f"cannot use {registries_conf}: {e}") from e
    for entry in config.get("registry", []):
        if entry.get("prefix", entry.get("location")) == host:
            mirrors = [m["location"] for m in entry.get("mirror", [])]
            return [*mirrors, entry.get("location", host)]
    raise HarnessError(f"{registries_conf} does not map {host!r}")


def write_authfile(path: Path, hosts: Sequence[str], creds: Credentials) -> Path:
    """A containers-auth.json giving ``creds`` for each of ``hosts`` (``host:port``)."""
    token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
    auths = {host: {"auth": token} for host in hosts}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths}, indent=2) + "\n")
    return path


def _authfile_for(
    registries_conf: Path, ref: str, creds: Credentials | None, authfile: Path | None, scratch: Path
) -> Path:
    """The auth file a skopeo/podman pull should use.

    ``--creds`` does not work with a remapped registry: containers/image sends those
    credentials only to the reference's own host (``example.test``), never to a different
    location or mirror, and looks the others up in auth files by their real ``host:port``.
    So ``creds`` are written into an auth file for every endpoint. With neither ``creds`` nor
    ``authfile`` the file is empty, so that the machine's own stored credentials
    (``~/.docker/config.json``, …) never leak into an "anonymous" pull.
    """
    endpoints = registry_endpoints(registries_conf, ref)
    if authfile is not None:
        if creds is not None:
            raise HarnessError("give creds or authfile, not both")
        return authfile
    path = scratch / "auth.json"
    if creds is None:
        path.write_text('{"auths": {}}\n')
        return path
    return write_authfile(path, endpoints, creds)


def skopeo_copy(
    ref: str,
    *,
    registries_conf: Path,
    out_dir: Path,
    creds: Credentials | None = None,
    authfile: Path | None = None,
    timeout: float = 300.0,
    command_prefix: Sequence[str] = (),
) -> PullResult:
    """``skopeo copy docker://REF dir:OUT_DIR`` with the given registries.conf.

    ``out_dir`` receives the manifest and one file per blob, named by hex digest. ``creds``
    are offered to every endpoint (see :func:`_authfile_for`); ``authfile`` is used as is.
    """
    binary = require_binary("skopeo")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="harness-skopeo-") as tmp:
        scratch = Path(tmp)
        auth = _authfile_for(registries_conf, ref, creds, authfile, scratch)
        # Our own accept-anything policy: the machine's policy.json may be missing or strict.
        policy = scratch / "policy.json"
        policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
        argv = [
            *command_prefix,
            binary,
            "--registries-conf",
            str(registries_conf),
            "--policy",
            str(policy),
            "copy",
            "--src-authfile",
            str(auth),
            f"docker://{ref}",
            f"dir:{out_dir}",
        ]
        started = time.monotonic()
        result = run(argv, timeout=timeout, what=f"skopeo copy {ref}")
    return PullResult("skopeo", ref, time.monotonic() - started, result.stdout + result.stderr)


def podman_pull(
    ref: str,
    *,
    registries_conf: Path,
    workdir: Path,
    creds: Credentials | None = None,
    authfile: Path | None = None,
    timeout: float = 300.0,
    command_prefix: Sequence[str] = (),
) -> PullResult:
    """``podman pull REF`` into a private store under ``workdir`` (vfs storage driver).

    Use a fresh ``workdir`` for a cold pull. vfs copies every layer in full, so large images
    take a while to store. Credentials work as for :func:`skopeo_copy`.
    """
    binary = require_binary("podman")
    workdir.mkdir(parents=True, exist_ok=True)
    auth = _authfile_for(registries_conf, ref, creds, authfile, workdir)
    env = dict(os.environ)
    env["CONTAINERS_REGISTRIES_CONF"] = str(registries_conf)
    # podman refuses a runroot longer than 50 characters, so runroot and tmpdir (both
    # throw-away) live in a short directory under the system temp dir.
    with tempfile.TemporaryDirectory(prefix="harness-podman-") as run_dir:
        argv = [
            *command_prefix,
            binary,
            "--root",
            str(workdir / "root"),
            "--runroot",
            f"{run_dir}/run",
            "--tmpdir",
            f"{run_dir}/tmp",
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
            "pull",
            "--authfile",
            str(auth),
            ref,
        ]
        started = time.monotonic()
        result = run(argv, timeout=timeout, what=f"podman pull {ref}", env=env)
    return PullResult("podman", ref, time.monotonic() - started, result.stdout + result.stderr)


def pull_concurrently(
    pulls: Mapping[str, tuple[Containerd, Path]],
    ref: str,
    *,
    user: Credentials | None = None,
    timeout: float = 600.0,
) -> dict[str, float | str]:
    """Pull ``ref`` with every (containerd, hosts dir) at once, one thread each.

    Returns name -> seconds for a pull that worked, or the error text for one that failed.
    """
    results: dict[str, float | str] = {}

    def pull(name: str, containerd: Containerd, hosts_dir: Path) -> None:
        try:
            results[name] = containerd.pull(ref, hosts_dir=hosts_dir, user=user).seconds
        except HarnessError as exc:
            results[name] = str(exc)

    threads = [threading.Thread(target=pull, args=(name, c, d)) for name, (c, d) in pulls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results
