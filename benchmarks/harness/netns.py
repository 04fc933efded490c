"""Hosts with their own addresses and bandwidth: network namespaces on a bridge.

:class:`NetnsFleet` builds, for one run, a *switch* namespace holding a bridge and one namespace
per host, each joined to the bridge by a veth pair (``eth0`` in the host, ``v<K>`` in the
switch) with the address ``10.200.0.K/24``. Links can be limited with ``tc tbf``: a host's
*upload* is a qdisc on its own ``eth0``, its *download* a qdisc on the switch side of its veth
(the only place where every byte towards the host queues). Everything is torn down on exit,
also when the body fails or a signal arrives (see :func:`signals_raise`).

Rules (see shared/REAL_COMPONENTS.md):

* **Nothing in the root namespace ever addresses a 10.200.x host.** The root namespace has no
  route there, so such packets would leave through the real default gateway. Every process that
  talks to a host address runs inside a namespace: :meth:`NetnsFleet.exec_argv` prefixes a
  command with ``ip netns exec``, :meth:`NetnsFleet.process` starts a daemon that way, and
  :meth:`NetnsFleet.http_get_in` makes a GET (readiness polls, ``/stats``) from a short-lived
  Python inside a host's namespace. It refuses any URL outside loopback and this fleet's subnet.
  Link counters are read with netlink (``ip -n``) or from ``/proc/PID/net/dev``: no packets.
* The host namespaces have no default route, so a process inside one that tries to reach the
  outside world gets "network unreachable" instead of leaking.
* Namespace names carry a per-run prefix (``p2pb<pid>-``), so parallel runs and leftovers never
  collide, and only the namespaces this object created are deleted (one ``ip netns del`` each).
  A run killed with SIGKILL cannot clean up; :func:`delete_leftovers` removes namespaces whose
  creating process is gone (``p2p-bench hosts --delete-leftovers``), never those of a live run.
  Stop the processes started inside them first: a namespace lives on while a process holds it.
* Every command has a deadline (:func:`benchmarks.harness.procs.run`); every wait is bounded.
* Creating namespaces needs root: :func:`require_root` says so plainly instead of failing deep
  inside ``ip``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from benchmarks.harness.procs import HarnessError, Managed, Process, require_binary, run

DEFAULT_SUBNET = "10.200.0"
# tbf parameters. A burst of 32 kbit holds the rate (measured 95 of 100 Mbit here); the queue
# latency bounds the buffer. REAL_COMPONENTS.md used 400 ms; that is 5 MB of queue at 100 Mbit,
# so a few competing TCP flows would see seconds of delay. 50 ms is a deep switch buffer.
DEFAULT_BURST = "32kbit"
DEFAULT_LATENCY = "50ms"

# A GET from inside a namespace: stdlib only and started with -S, so it costs ~20 ms, not the
# ~250 ms of importing httpx. Prints the status on the first line, then the body.
_GET_SCRIPT = """\
import http.client, sys, urllib.parse
url = urllib.parse.urlsplit(sys.argv[1])
try:
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=float(sys.argv[2]))
    conn.request("GET", (url.path or "/") + ("?" + url.query if url.query else ""))
    response = conn.getresponse()
    body = response.read()
except (OSError, http.client.HTTPException) as exc:
    sys.stderr.write(f"{type(exc).__name__}: {exc}")
    sys.exit(3)
sys.stdout.write(f"{response.status}\\n")
sys.stdout.flush()
sys.stdout.buffer.write(body)
"""


_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def namespace_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without proxy settings, plus ``extra``.

    httpx honours ``HTTP_PROXY`` and friends; inside a namespace a proxy is unreachable at
    best, and at worst a request meant for a fleet host would be handed to someone else.
    """
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARIABLES}
    env.update(extra or {})
    return env


def require_root(what: str = "this benchmark") -> None:
    """Raise a clear :class:`HarnessError` unless running as root (namespaces need it)."""
    if os.geteuid() != 0:
        raise HarnessError(
            f"{what} builds network namespaces and tc limits, which needs root; run it as root "
            f"(CI does) or with sudo"
        )
    require_binary("ip")
    require_binary("tc")


@dataclass(frozen=True)
class HostSpec:
    """A host to build: its name and optional link limits in Mbit/s (None: unlimited)."""

    name: str
    up_mbit: float | None = None
    down_mbit: float | None = None


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str
    index: int
    up_mbit: float | None
    down_mbit: float | None

    @property
    def switch_port(self) -> str:
        """The switch-side veth (in the switch namespace; names there are ours alone)."""
        return f"v{self.index}"


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes


class NetnsFleet(Managed):
    """Namespaces on one bridge, with tbf limits; a context manager that cleans up after itself.

    Hosts get addresses ``<subnet>.1``, ``<subnet>.2``, … in the order given.
    """

    def __init__(
        self,
        hosts: Sequence[HostSpec],
        *,
        prefix: str | None = None,
        subnet: str = DEFAULT_SUBNET,
        burst: str = DEFAULT_BURST,
        latency: str = DEFAULT_LATENCY,
    ) -> None:
        if not 1 <= len(hosts) <= 250:
            raise HarnessError(f"a fleet has 1..250 hosts, not {len(hosts)}")
        if len({h.name for h in hosts}) != len(hosts):
            raise HarnessError("host names must be unique")
        self.network = ipaddress.IPv4Network(f"{subnet}.0/24")
        if not self.network.subnet_of(ipaddress.IPv4Network("10.200.0.0/16")):
            raise HarnessError(f"fleet subnets live in 10.200.0.0/16, not {self.network}")
        self.prefix = prefix or f"p2pb{os.getpid()}"
        self.burst = burst
        self.latency = latency
        self.switch = f"{self.prefix}-sw"
        self.hosts = {
            spec.name: Host(
                name=spec.name,
                netns=f"{self.prefix}-{spec.name}",
                address=f"{subnet}.{i}",
                index=i,
                up_mbit=spec.up_mbit,
                down_mbit=spec.down_mbit,
            )
            for i, spec in enumerate(hosts, start=1)
        }
        self._created: list[str] = []

    # -- building and tearing down ------------------------------------------------------------

    def start(self) -> None:
        require_root()
        try:
            self._add_netns(self.switch)
            self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.switch, "link", "set", "br0", "up")
            for host in self.hosts.values():
                self._add_host(host)
        except BaseException:
            self.close()
            raise

    def _add_netns(self, name: str) -> None:
        if name in _list_netns():
            raise HarnessError(f"network namespace {name} exists already (a leftover?)")
        self._ip("netns", "add", name)
        self._created.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")

    def _add_host(self, host: Host) -> None:
        self._add_netns(host.netns)
        port = host.switch_port
        self._ip(
            "-n", self.switch, "link", "add", port, "type", "veth",
            "peer", "name", "eth0", "netns", host.netns,
        )  # fmt: skip
        self._ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        self._ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        self._ip("-n", host.netns, "link", "set", "eth0", "up")
        if host.up_mbit:
            self._tbf(host.netns, "eth0", host.up_mbit)
        if host.down_mbit:
            self._tbf(self.switch, port, host.down_mbit)

    def _tbf(self, netns: str, dev: str, mbit: float) -> None:
        rate = f"{round(mbit * 1000)}kbit"  # tc's kbit is 1000 bit/s
        argv = ["tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate]
        run(
            [*argv, "burst", self.burst, "latency", self.latency],
            timeout=10,
            what=f"tbf on {netns}/{dev}",
        )

    def _ip(self, *args: str) -> None:
        run(["ip", *args], timeout=10, what=f"ip {' '.join(args)}")

    def close(self) -> None:
        """Delete the namespaces this fleet created (host namespaces first), each one alone."""
        errors = []
        while self._created:
            name = self._created.pop()
            result = run(["ip", "netns", "del", name], timeout=10, what="", check=False)
            if result.returncode != 0 and name in _list_netns():
                errors.append(f"{name}: {result.stderr.strip()}")
        if errors:
            raise HarnessError("could not delete namespaces: " + "; ".join(errors))

    def stop(self) -> None:
        self.close()

    # -- running things inside ----------------------------------------------------------------

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise HarnessError(f"no host {name!r} in this fleet") from None

    def exec_argv(self, host: Host | str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the host's namespace."""
        h = self.host(host) if isinstance(host, str) else host
        return ["ip", "netns", "exec", h.netns, *argv]

    def command_prefix(self, host: Host | str) -> list[str]:
        """A prefix that runs a command inside the host's namespace without proxy settings,
        for helpers that take one (``Containerd.pull(command_prefix=…)``)."""
        unset = [a for v in sorted(_PROXY_VARIABLES) for a in ("-u", v, "-u", v.upper())]
        return self.exec_argv(host, ["env", *unset])

    def process(
        self,
        host: Host | str,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """A (not yet started) :class:`Process` that runs inside the host's namespace.

        ``ip netns exec`` execs the command, so the PID is the daemon's own and stopping by
        PID works as for any other process.
        """
        return Process(name, self.exec_argv(host, argv), log_path=log_path, env=namespace_env(env))

    def run_in(
        self, host: Host | str, argv: Sequence[str], *, timeout: float, what: str
    ) -> subprocess.CompletedProcess[str]:
        """A short command inside the host's namespace; raises with its output on failure."""
        return run(self.exec_argv(host, argv), timeout=timeout, what=what, env=namespace_env())

    def check_target(self, url: str) -> None:
        """Refuse a URL that is neither loopback nor a host of this fleet."""
        hostname = urllib.parse.urlsplit(url).hostname or ""
        try:
            address = ipaddress.ip_address(hostname)
        except ValueError:
            raise HarnessError(f"{url}: only literal fleet or loopback addresses") from None
        if not (address.is_loopback or address in self.network):
            raise HarnessError(f"{url} is outside this fleet ({self.network}) and loopback")

    def http_get_in(self, host: Host | str, url: str, *, timeout: float = 5.0) -> HttpReply:
        """``GET url`` from inside the host's namespace; status 0 if no answer came."""
        self.check_target(url)
        argv = [sys.executable, "-S", "-c", _GET_SCRIPT, url, str(timeout)]
        try:
            result = subprocess.run(
                self.exec_argv(host, argv),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout + 10,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return HttpReply(0, b"")
        if result.returncode != 0:
            return HttpReply(0, result.stderr)
        head, _, body = result.stdout.partition(b"\n")
        return HttpReply(int(head), body)

    def wait_http_in(
        self,
        host: Host | str,
        url: str,
        *,
        timeout: float,
        statuses: Sequence[int] = (200,),
        process: Process | None = None,
    ) -> None:
        """Poll ``GET url`` from inside the host until it answers one of ``statuses``.

        With ``process``, fail at once (with its log) if it exits meanwhile.
        """

        def ready() -> bool:
            return self.http_get_in(host, url, timeout=2.0).status in statuses

        if process is not None:
            process.wait_ready(ready, timeout=timeout, what=f"GET {url}")
            return
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() >= deadline:
                raise HarnessError(f"timed out after {timeout:.0f} s waiting for GET {url}")
            time.sleep(0.05)

    def link_bytes(self, host: Host | str) -> tuple[int, int]:
        """(received, sent) bytes on the host's ``eth0``, read over netlink (no packets)."""
        h = self.host(host) if isinstance(host, str) else host
        out = run(
            ["ip", "-n", h.netns, "-s", "-o", "link", "show", "dev", "eth0"],
            timeout=10,
            what=f"counters of {h.netns}",
        ).stdout
        return parse_ip_stats(out)


def parse_ip_stats(text: str) -> tuple[int, int]:
    """(rx bytes, tx bytes) from ``ip -s -o link show`` output (one line, ``\\`` joined)."""
    fields = text.replace("\\", " ").split()
    try:
        rx = fields[fields.index("RX:") + 7]
        tx = fields[fields.index("TX:") + 7]
        return int(rx), int(tx)
    except (ValueError, IndexError):
        raise HarnessError(f"cannot read link counters from {text[:300]!r}") from None


def proc_net_bytes(pid: int, dev: str = "eth0") -> tuple[int, int]:
    """(rx, tx) bytes of ``dev`` in the namespace of process ``pid``, from /proc (no packets).

    Cheap enough to sample several times a second.
    """
    with open(f"/proc/{pid}/net/dev", encoding="ascii") as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == dev:
                values = rest.split()
                return int(values[0]), int(values[8])
    raise HarnessError(f"no {dev} in the namespace of process {pid}")


_RUN_PREFIX = re.compile(r"(p2p[bt])(\d+)-[A-Za-z0-9_.-]+")


def leftover_namespaces() -> list[str]:
    """Namespaces named by a fleet (``p2pb<pid>-…``, ``p2pt<pid>-…``) whose creating process
    is gone: what a run killed with SIGKILL leaves behind. Never those of a live run."""
    leftovers = []
    for name in sorted(_list_netns()):
        match = _RUN_PREFIX.fullmatch(name)
        if match is not None and not Path(f"/proc/{match.group(2)}").exists():
            leftovers.append(name)
    return leftovers


def delete_leftovers() -> list[str]:
    """Delete :func:`leftover_namespaces`, one ``ip netns del`` each; returns their names."""
    names = leftover_namespaces()
    for name in names:
        run(["ip", "netns", "del", name], timeout=10, what=f"delete leftover {name}")
    return names


def _list_netns() -> set[str]:
    out = run(["ip", "netns", "list"], timeout=10, what="ip netns list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


class Interrupted(BaseException):
    """A SIGTERM or SIGHUP arrived: unwind (and so clean up) like a Ctrl-C."""


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Interrupted` while the block runs.

    Python's default for them is to die at once, skipping every ``finally``; a namespace or a
    daemon left behind would outlive the run. SIGINT already raises KeyboardInterrupt.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(f"received {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
