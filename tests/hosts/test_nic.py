"""`p2pd.nic` on a real interface: a veth pair in a namespace of its own (root needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ADDRESS = "10.200.250.1"  # inside the test's own namespace only
ROOT = Path(__file__).resolve().parents[2]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("tests/hosts builds network namespaces and needs root (CI runs as root)")
    name = f"p2pnic{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "add", "nic0", "type", "veth", "peer", "name", "nic1")
        _ip("-n", name, "addr", "add", f"{ADDRESS}/24", "dev", "nic0")
        _ip("-n", name, "link", "set", "nic0", "up")
        _ip("-n", name, "link", "set", "nic1", "up")
        yield name
    finally:
        _ip("netns", "del", name)


def test_the_interface_holding_the_address_and_its_speed_are_found(namespace: str) -> None:
    speed = Path("/sys/class/net/nic0/speed")  # read inside the namespace, below
    probe = (
        "from p2pd import nic; "
        f"print(nic.interface_of({ADDRESS!r}), open({str(speed)!r}).read().strip(), "
        f"nic.uplink_of({ADDRESS!r}), nic.uplink_of('127.0.0.1'))"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    name, mbit, uplink, loopback = done.stdout.split()
    assert name == "nic0"
    assert float(uplink) == int(mbit) * 1e6 / 8 > 0  # veth reports a nominal 10 000 Mbit/s
    assert loopback == "None"
