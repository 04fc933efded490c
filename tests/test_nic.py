"""The daemon finds the interface holding its advertised address and reads its speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pd import nic


def test_loopback_is_found_and_has_no_speed() -> None:
    assert nic.interface_of("127.0.0.1") == "lo"
    assert nic.link_speed("lo") is None  # the kernel refuses to read lo's speed
    assert nic.uplink_of("127.0.0.1") is None


def test_an_address_no_interface_holds_or_no_ipv4_address_is_unknown() -> None:
    assert nic.interface_of("192.0.2.77") is None  # TEST-NET-1: on no interface here
    assert nic.interface_of("node-3") is None  # a host name: not looked up
    assert nic.interface_of("::1") is None  # IPv6: not supported
    assert nic.uplink_of("192.0.2.77") is None


def test_speed_is_read_in_mbit_and_given_in_bytes(tmp_path: Path) -> None:
    for name, text in (("eth1", "1000\n"), ("eth2", "-1\n"), ("eth3", "fast\n"), ("eth4", "100")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "speed").write_text(text)
    assert nic.link_speed("eth1", tmp_path) == 125e6
    assert nic.link_speed("eth2", tmp_path) is None  # -1: the driver does not know
    assert nic.link_speed("eth3", tmp_path) is None
    assert nic.link_speed("eth4", tmp_path) == 12.5e6
    assert nic.link_speed("eth9", tmp_path) is None  # no such interface


def test_no_interface_list_means_unknown_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> list[tuple[int, str]]:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(nic.socket, "if_nameindex", refuse)
    assert nic.interface_of("127.0.0.1") is None
    assert nic.uplink_of("127.0.0.1") is None
