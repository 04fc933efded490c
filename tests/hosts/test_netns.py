"""The pure parts of `benchmarks.harness.netns`: no root, no namespaces needed."""

from __future__ import annotations

import os

import pytest

from benchmarks.harness.netns import (
    HostSpec,
    NetnsFleet,
    parse_ip_stats,
    proc_net_bytes,
)
from benchmarks.harness.procs import HarnessError

IP_S_O = (
    "2: eth0@if3: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc tbf state UP mode DEFAULT "
    "group default qlen 1000\\    link/ether f2:3e:6c:27:76:82 brd ff:ff:ff:ff:ff:ff "
    "link-netns p2pb1-sw\\    RX:  bytes packets errors dropped  missed   mcast           "
    "\\            1145434       1      0       0       0       0 \\    TX:  bytes packets "
    "errors dropped carrier collsns           \\            65783136       1      0       0  "
    "     0       0 "
)


def test_link_counters_are_read_from_ip_s_o() -> None:
    assert parse_ip_stats(IP_S_O) == (1145434, 65783136)
    with pytest.raises(HarnessError):
        parse_ip_stats("garbage")


def test_only_loopback_and_fleet_addresses_may_be_addressed() -> None:
    fleet = NetnsFleet([HostSpec("a"), HostSpec("b")], prefix="p2pbtest")
    assert fleet.host("b").address == "10.200.0.2"
    assert fleet.host("b").netns == "p2pbtest-b"
    fleet.check_target("http://10.200.0.2:65003/stats")
    fleet.check_target("http://127.0.0.1:65001/v2/")
    for url in ("http://10.200.1.2/", "http://192.0.2.1/", "http://example.test/", "http://x/"):
        with pytest.raises(HarnessError):
            fleet.check_target(url)
    assert fleet.exec_argv("a", ["true"]) == ["ip", "netns", "exec", "p2pbtest-a", "true"]


def test_fleets_stay_in_10_200() -> None:
    with pytest.raises(HarnessError):
        NetnsFleet([HostSpec("a")], subnet="10.1.0")
    with pytest.raises(HarnessError):
        NetnsFleet([HostSpec("a"), HostSpec("a")])


def test_proc_net_bytes_reads_this_namespace() -> None:
    rx, tx = proc_net_bytes(os.getpid(), "lo")
    assert rx >= 0 and tx >= 0
