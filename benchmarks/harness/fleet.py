"""Our own daemons as real processes: a supernode and p2pd hosts on loopback.

Used by the end-to-end tests and by the demo. Each daemon runs as ``python -m <pkg>.cli`` with
its own data directory and log file, on ports the kernel picked, and is stopped by PID.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness.procs import LOOPBACK, Managed, Process, free_port, http_responds


class SupernodeProcess(Managed):
    def __init__(
        self, workdir: Path, upstreams: Sequence[str], *, extra: Sequence[str] = ()
    ) -> None:
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.url = f"http://{self.address}"
        self.data_dir = workdir / "supernode-data"
        argv = [
            sys.executable,
            "-m",
            "supernode.cli",
            "--listen",
            self.address,
            "--data-dir",
            str(self.data_dir),
            *[a for u in upstreams for a in ("--upstream", u)],
            *extra,
        ]
        self.process = Process("supernode", argv, log_path=workdir / "supernode.log")

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(
            http_responds(f"{self.url}/healthz"), timeout=20, what="supernode /healthz"
        )

    def stop(self) -> None:
        self.process.stop()


class P2pdProcess(Managed):
    def __init__(
        self,
        workdir: Path,
        name: str,
        *,
        supernodes: Sequence[str],
        registries: Mapping[str, str],
        default_upstream: str = "",
        extra: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.mirror_port = free_port()
        self.peer_port = free_port()
        self.mirror_url = f"http://{LOOPBACK}:{self.mirror_port}"
        self.peer_url = f"http://{LOOPBACK}:{self.peer_port}"
        self.data_dir = workdir / f"{name}-data"
        argv = [
            sys.executable,
            "-m",
            "p2pd.cli",
            "run",
            "--mirror-listen",
            f"{LOOPBACK}:{self.mirror_port}",
            "--peer-listen",
            f"{LOOPBACK}:{self.peer_port}",
            "--peer-id",
            name,
            "--data-dir",
            str(self.data_dir),
            "--supernodes",
            ",".join(supernodes),
            *[a for k, v in registries.items() for a in ("--registry", f"{k}={v}")],
            *(["--default-upstream", default_upstream] if default_upstream else []),
            *extra,
        ]
        self.process = Process(f"p2pd {name}", argv, log_path=workdir / f"{name}.log")

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(
            http_responds(f"{self.peer_url}/healthz"), timeout=20, what="p2pd /healthz"
        )

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.stop(grace=0)

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.peer_url}/stats", timeout=5).json()
        return data
