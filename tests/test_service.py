"""Running as a systemd service: unit files, readiness over a real NOTIFY_SOCKET, reload,
clean stop, metrics."""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.harness.procs import free_port
from p2pd.config import P2pdConfig, add_arguments, from_args
from supernode.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


@pytest.mark.parametrize("unit", ["p2pd.service", "supernode.service"])
def test_unit_files_verify(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing (Debian package systemd)"
    text = (DEPLOY / "systemd" / unit).read_text()
    # verify checks that ExecStart's binary exists: point it at this checkout's commands
    binary = Path(sys.executable).parent / unit.removesuffix(".service")
    text = text.replace(f"/usr/local/bin/{unit.removesuffix('.service')}", str(binary))
    path = tmp_path / unit
    path.write_text(text)
    out = subprocess.run(
        [analyze, "verify", str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr
    assert "Type=notify" in text and "Restart=on-failure" in text
    assert "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text


def test_example_configs_load() -> None:
    p2pd = P2pdConfig.load(DEPLOY / "p2pd.toml")
    assert p2pd.supernodes and str(p2pd.advertise) == "10.0.0.7:65003"
    supernode = load_config(DEPLOY / "supernode.toml", {})
    assert supernode.allowed_upstreams


def test_example_configs_name_every_option() -> None:
    """The annotated files are the configuration reference: no option may be missing."""
    from p2pd.config import OPTIONS as P2PD_OPTIONS
    from supernode.config import OPTIONS as SUPERNODE_OPTIONS

    def keys(path: Path) -> set[str]:
        found, table = set(), ""
        for line in path.read_text().splitlines():
            text = line.lstrip("# ").split("#")[0].strip()
            if text.startswith("["):
                table = text.strip("[]") + "."
                found.add(table.rstrip("."))
            elif "=" in text:
                found.add(table + text.split("=")[0].strip())
        return found

    p2pd = keys(DEPLOY / "p2pd.toml")
    assert set(P2PD_OPTIONS) <= p2pd, set(P2PD_OPTIONS) - p2pd
    supernode = keys(DEPLOY / "supernode.toml")
    names = {o.name for o in SUPERNODE_OPTIONS}
    assert names <= supernode, names - supernode


def test_kubernetes_example_config_and_variables_are_valid(tmp_path: Path) -> None:
    """Kubernetes is not run here; its file's p2pd configuration and variables are checked."""
    text = (DEPLOY / "kubernetes" / "p2pd-daemonset.yaml").read_text()
    block = text.split("p2pd.toml: |\n", 1)[1].split("\n---", 1)[0]
    toml_path = tmp_path / "p2pd.toml"
    env = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("- name: P2PD_"):
            name = line.split(":", 1)[1].strip()
            value = lines[i + 1].split("value:", 1)[1].split("#")[0].strip().strip('"')
            env[name] = value.replace("$(NODE_IP)", "10.1.2.3")
    assert set(env) == {"P2PD_ADVERTISE", "P2PD_ZONE"}
    toml_path.write_text("\n".join(line.removeprefix("    ") for line in block.splitlines()))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_args(parser.parse_args(["--config", str(toml_path)]), env)
    assert str(config.advertise) == "10.1.2.3:65003" and config.peer_listen.is_wildcard
    assert config.supernodes and config.quota_bytes == 50_000_000_000


class Notifications:
    """A NOTIFY_SOCKET like systemd's: a unix datagram socket we read states from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.5)

    def wait_for(self, state: str, timeout: float = 30.0) -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            seen.append(data)
            if state in data.split("\n"):
                return seen
        raise AssertionError(f"no {state} within {timeout} s; got {seen}")

    def close(self) -> None:
        self.sock.close()


def test_p2pd_readiness_reload_and_stop(tmp_path: Path) -> None:
    notify = Notifications(tmp_path / "notify.sock")
    peer_port = free_port()
    config = tmp_path / "p2pd.toml"
    config.write_text(
        f'mirror_listen = "127.0.0.1:{free_port()}"\n'
        f'peer_listen = "127.0.0.1:{peer_port}"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        "upload_rate = 0\n"
    )
    log_file = (tmp_path / "p2pd.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pd.cli", "run"],
        # the file and one option from the environment, as a unit's Environment= would
        env={
            "NOTIFY_SOCKET": str(notify.path),
            "PATH": "/usr/bin:/bin",
            "P2PD_CONFIG": str(config),
            "P2PD_DOWNLOAD_RATE": "4242",
        },
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    try:
        notify.wait_for("READY=1")
        # ready means listening: the peer port answers at once
        assert httpx.get(f"http://127.0.0.1:{peer_port}/healthz", timeout=5).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{peer_port}/metrics", timeout=5)
        assert metrics.status_code == 200
        assert "p2pd_client_bytes_total 0.0" in metrics.text
        assert "p2pd_downloads_active 0.0" in metrics.text
        assert "p2pd_announce_batches_total 0.0" in metrics.text
        assert "p2pd_announces_batched_total 0.0" in metrics.text

        config.write_text(config.read_text().replace("upload_rate = 0", "upload_rate = 12345"))
        proc.send_signal(signal.SIGHUP)
        seen = notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        assert seen

        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        log_file.close()
    log = (tmp_path / "p2pd.log").read_text()
    # the reload re-read the file and still honoured the environment
    assert "reloaded: upload_rate=12345 download_rate=4242" in log


def test_supernode_readiness_and_stop(tmp_path: Path) -> None:
    notify = Notifications(tmp_path / "notify.sock")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supernode.cli",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path / "data"),
            "--upstream",
            "http://127.0.0.1:1",
        ],
        env={"NOTIFY_SOCKET": str(notify.path), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        notify.wait_for("READY=1")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert "supernode_control_messages_total 0.0" in metrics.text
        assert "supernode_pace_seconds 0.0" in metrics.text
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
