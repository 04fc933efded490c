"""The real-host fleet: registry, supernode and p2pd hosts in namespaces, a containerd per host.

Layout (addresses in the fleet's /24, see `benchmarks.harness.netns`)::

    .1  reg   docker-registry on :5000; its upload is the registry's egress limit
    .2  sn    supernode on :65002 (control calls and pieces), limited both ways
    .3… h1…   p2pd: mirror on 127.0.0.1:65001 *inside* the host, pieces on .K:65003

The containerd daemons run in the root namespace (they make no network calls of their own:
``ctr`` fetches and hands the content over the unix socket), and ``ctr`` runs inside its host's
namespace, so each registry or mirror request starts from the right host. Every containerd has
its own root: a pull is cold unless the same containerd pulled the image before (`reset`).

Rules:

* Nothing in this process addresses a fleet host: readiness polls, ``/stats`` and the
  registry's log marker go through `NetnsFleet.http_get_in`, the push runs as
  ``python -m benchmarks.hosts.inns`` inside the registry's namespace.
* Pulls through p2pd use a hosts.toml whose fallback ``server`` is a dead loopback port
  (`write_hosts_toml(fallback=False)`), so a failing mirror fails the pull instead of being
  hidden; "direct" pulls use a hosts.toml naming only the registry.
* Registry egress is counted from the registry's own access log (`Registry` parses it).
* Everything is stopped and deleted on the way out (an `ExitStack`: processes first, then the
  namespaces), also when starting fails half-way.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness.clients import Containerd, write_hosts_toml
from benchmarks.harness.image import Image
from benchmarks.harness.netns import Host, HostSpec, NetnsFleet, proc_net_bytes
from benchmarks.harness.procs import HarnessError, Managed, Process, require_binary, wait_for
from benchmarks.harness.registry import Registry
from benchmarks.hosts.inns import image_to_json

REGISTRY_NAME = "example.test"
REGISTRY_PORT = 5000
SUPERNODE_PORT = 65002
MIRROR_PORT = 65001
PEER_PORT = 65003
STARTUP_TIMEOUT = 30.0


@dataclass(frozen=True)
class ClusterConfig:
    """How many hosts and their links in Mbit/s each way (None: unlimited)."""

    hosts: int
    host_up_mbit: float | None = None
    host_down_mbit: float | None = None
    registry_mbit: float | None = None
    supernode_mbit: float | None = None
    tbf_burst: str = "32kbit"
    tbf_latency: str = "50ms"
    p2pd_extra: tuple[str, ...] = ()
    prefix: str | None = None


class NsRegistry(Registry):
    """`Registry`, serving on a fleet host's address from inside that host's namespace."""

    def __init__(self, fleet: NetnsFleet, node: Host, workdir: Path) -> None:
        super().__init__(workdir, startup_timeout=STARTUP_TIMEOUT)
        self.fleet = fleet
        self.node = node
        self.port = REGISTRY_PORT

    @property
    def host(self) -> str:
        return f"{self.node.address}:{self.port}"

    def start(self) -> None:
        if self._process is not None:
            raise HarnessError("registry already running")
        binary = require_binary("docker-registry")
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self._config(), indent=2))
        process = self.fleet.process(
            self.node, "docker-registry", [binary, "serve", str(self.config_path)],
            log_path=self.log_path,
        )  # fmt: skip
        process.start()
        try:
            self.fleet.wait_http_in(
                self.node,
                f"{self.url}/v2/",
                timeout=self.startup_timeout,
                statuses=(200, 401),
                process=process,
            )
        except BaseException:
            process.stop()
            raise
        self._process = process

    def sync(self, timeout: float = 5.0) -> None:
        marker = f"/v2/?harness-sync={uuid.uuid4().hex}"
        reply = self.fleet.http_get_in(self.node, self.url + marker, timeout=timeout)
        if reply.status == 0:
            raise HarnessError(f"registry did not answer the log marker request: {reply.body!r}")
        wait_for(
            lambda: marker in self._read_log(),
            timeout=timeout,
            what="the registry to log the marker request",
        )

    def blob_bytes_by_remote(self) -> dict[str, int]:
        """Blob body bytes served so far, per client address (port stripped)."""
        served: dict[str, int] = {}
        for r in self.requests():
            if r.served_blob_bytes:
                remote = r.remote.rsplit(":", 1)[0] if r.remote.count(":") == 1 else r.remote
                served[remote] = served.get(remote, 0) + r.written
        return served


@dataclass
class PullOutcome:
    """One host's pull: start and end in seconds from the storm's first start."""

    host: str
    start: float
    end: float
    error: str | None

    @property
    def seconds(self) -> float:
        return self.end - self.start


class P2pHost:
    """One p2pd host: its namespace, daemon, containerd and the two hosts.toml directories."""

    def __init__(self, cluster: Cluster, node: Host, workdir: Path) -> None:
        self.cluster = cluster
        self.node = node
        self.name = node.name
        self.peer_url = f"http://{node.address}:{PEER_PORT}"
        self.mirror_url = f"http://127.0.0.1:{MIRROR_PORT}"  # loopback of *its* namespace
        self.data_dir = workdir / "p2pd-data"
        argv = [
            sys.executable, "-m", "p2pd.cli", "run",
            "--mirror-listen", f"127.0.0.1:{MIRROR_PORT}",
            "--peer-listen", f"{node.address}:{PEER_PORT}",
            "--advertise", f"{node.address}:{PEER_PORT}",
            "--peer-id", node.name,
            "--supernodes", cluster.supernode_url,
            "--registry", f"{REGISTRY_NAME}={cluster.registry.url}",
            "--data-dir", str(self.data_dir),
            *cluster.config.p2pd_extra,
        ]  # fmt: skip
        self.process = cluster.fleet.process(
            node, f"p2pd {node.name}", argv, log_path=workdir / "p2pd.log"
        )
        self.containerd = Containerd(workdir / "containerd", startup_timeout=STARTUP_TIMEOUT)
        self.via_p2pd = workdir / "hosts-p2pd.d"
        self.direct = workdir / "hosts-direct.d"
        write_hosts_toml(
            self.via_p2pd, REGISTRY_NAME, cluster.registry.url, self.mirror_url, fallback=False
        )
        write_hosts_toml(self.direct, REGISTRY_NAME, cluster.registry.url)

    def stats(self) -> dict[str, Any]:
        reply = self.cluster.fleet.http_get_in(self.node, f"{self.peer_url}/stats")
        if reply.status != 200:
            raise HarnessError(f"{self.name}: /stats answered {reply.status} {reply.body[:300]!r}")
        data: dict[str, Any] = json.loads(reply.body)
        return data

    def peak_rss(self) -> int:
        """p2pd's peak resident set (VmHWM) in bytes so far."""
        return peak_rss(self.process.pid)


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise HarnessError(f"no VmHWM for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (its threads included)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class EgressSampler:
    """Samples the registry's sent bytes (its namespace's eth0, from /proc) in a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._base = 0

    def start(self) -> None:
        self._base = proc_net_bytes(self.pid)[1]
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sent = proc_net_bytes(self.pid)[1] - self._base
            except (OSError, HarnessError):
                return  # the registry is gone: nothing more to sample
            self.timeline.append((time.monotonic(), sent))
            self._stop.wait(self.interval)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.timeline


class Cluster(Managed):
    """The whole fleet, started on ``__enter__`` and torn down on ``__exit__``."""

    def __init__(self, workdir: Path, config: ClusterConfig) -> None:
        if config.hosts < 1:
            raise HarnessError("a cluster needs at least one p2pd host")
        self.workdir = workdir
        self.config = config
        c = config
        specs = [
            HostSpec("reg", up_mbit=c.registry_mbit),
            HostSpec("sn", up_mbit=c.supernode_mbit, down_mbit=c.supernode_mbit),
            *(
                HostSpec(f"h{i}", up_mbit=c.host_up_mbit, down_mbit=c.host_down_mbit)
                for i in range(1, c.hosts + 1)
            ),
        ]
        self.fleet = NetnsFleet(specs, prefix=c.prefix, burst=c.tbf_burst, latency=c.tbf_latency)
        self.registry = NsRegistry(self.fleet, self.fleet.host("reg"), workdir / "registry")
        sn = self.fleet.host("sn")
        self.supernode_url = f"http://{sn.address}:{SUPERNODE_PORT}"
        self.supernode: Process | None = None
        self.hosts: list[P2pHost] = []
        self._stack = ExitStack()

    def start(self) -> None:
        stack = self._stack
        try:
            stack.enter_context(self.fleet)
            stack.enter_context(self.registry)
            sn = self.fleet.host("sn")
            argv = [
                sys.executable, "-m", "supernode.cli",
                "--listen", f"{sn.address}:{SUPERNODE_PORT}",
                "--data-dir", str(self.workdir / "supernode" / "data"),
                "--upstream", self.registry.url,
            ]  # fmt: skip
            self.supernode = self.fleet.process(
                sn, "supernode", argv, log_path=self.workdir / "supernode" / "supernode.log"
            )
            stack.enter_context(self.supernode)
            self.hosts = [
                P2pHost(self, self.fleet.host(f"h{i}"), self.workdir / f"h{i}")
                for i in range(1, self.config.hosts + 1)
            ]
            # Start every daemon, then wait for each: the Python start-ups overlap.
            for host in self.hosts:
                stack.enter_context(host.process)
            self.fleet.wait_http_in(
                sn, f"{self.supernode_url}/healthz", timeout=STARTUP_TIMEOUT, process=self.supernode
            )
            for host in self.hosts:
                self.fleet.wait_http_in(
                    host.node,
                    f"{host.peer_url}/healthz",
                    timeout=STARTUP_TIMEOUT,
                    process=host.process,
                )
                stack.enter_context(host.containerd)
        except BaseException:
            stack.close()
            raise

    def close(self) -> None:
        self._stack.close()

    def stop(self) -> None:
        self.close()

    # -- driving it ---------------------------------------------------------------------------

    def push(self, image: Image, repo: str, tag: str, *, timeout: float = 300.0) -> None:
        """Push ``image`` from inside the registry's namespace (its loopback path is unlimited)."""
        description = self.workdir / f"push-{repo.replace('/', '_')}-{tag}.json"
        description.write_text(json.dumps(image_to_json(image)))
        argv = [
            sys.executable, "-m", "benchmarks.hosts.inns", "push",
            str(description), self.registry.url, repo, tag,
        ]  # fmt: skip
        self.fleet.run_in("reg", argv, timeout=timeout, what=f"push {repo}:{tag}")

    def reset_containerds(self, hosts: Sequence[P2pHost] | None = None) -> None:
        """Empty the containerds' content stores: the next pull is cold."""
        for host in self.hosts if hosts is None else hosts:
            host.containerd.reset()

    def pull_all(
        self,
        ref: str,
        hosts: Sequence[P2pHost] | None = None,
        *,
        via_p2pd: bool,
        timeout: float = 600.0,
    ) -> dict[str, PullOutcome]:
        """``ctr images pull`` on every host at once (one thread each, released together).

        Times are seconds from the first thread's start; a failed pull keeps its error text.
        """
        chosen = list(self.hosts if hosts is None else hosts)
        barrier = threading.Barrier(len(chosen))
        raw: dict[str, tuple[float, float, str | None]] = {}

        def pull(host: P2pHost) -> None:
            hosts_dir = host.via_p2pd if via_p2pd else host.direct
            prefix = self.fleet.command_prefix(host.node)
            try:
                barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                raw[host.name] = (0.0, 0.0, "the pull threads never started together")
                return
            start = time.monotonic()
            error = None
            try:
                host.containerd.pull(
                    ref, hosts_dir=hosts_dir, timeout=timeout, command_prefix=prefix
                )
            except HarnessError as exc:
                error = str(exc)
            raw[host.name] = (start, time.monotonic(), error)

        threads = [threading.Thread(target=pull, args=(h,), daemon=True) for h in chosen]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout + 60  # ctr itself is killed after `timeout`
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        missing = [h.name for h in chosen if h.name not in raw]
        if missing:
            raise HarnessError(f"pull threads did not finish: {missing}")
        t0 = min(start for start, _, _ in raw.values())
        return {
            name: PullOutcome(name, start - t0, end - t0, error)
            for name, (start, end, error) in sorted(raw.items(), key=lambda kv: _host_key(kv[0]))
        }


def _host_key(name: str) -> tuple[int, str]:
    digits = name.lstrip("h")
    return (int(digits), name) if digits.isdigit() else (0, name)


def check_pulls(outcomes: dict[str, PullOutcome], what: str) -> None:
    failed = {o.host: o.error for o in outcomes.values() if o.error is not None}
    if failed:
        details = "\n".join(f"--- {h}:\n{e}" for h, e in failed.items())
        raise HarnessError(f"{what}: {len(failed)} of {len(outcomes)} pulls failed\n{details}")
