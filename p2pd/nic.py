"""The speed of the network interface other hosts reach this daemon on.

The daemon registers one upload slot per 100 Mbit/s of uplink (`p2pd.core.uplink`). When the
operator set no ``upload_rate``, the uplink is the link speed the kernel reports for the
interface holding the advertised address (``/sys/class/net/<name>/speed``, in Mbit/s). Virtual
interfaces often report nothing (loopback, many paravirtual NICs) or a nominal figure (veth:
10 000); then the configured ``upload_slots`` stands. IPv4 only: the interface is found by asking
each one for its address (``SIOCGIFADDR``), which sees an interface's primary address only.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path
from typing import Final

SYS_NET: Final = Path("/sys/class/net")
_SIOCGIFADDR: Final = 0x8915  # linux/sockios.h
_IFREQ_SIZE: Final = 40  # struct ifreq: 16-byte name, then the union (a sockaddr_in here)


def interface_of(address: str) -> str | None:
    """The name of the interface whose IPv4 address is `address`, or None."""
    try:
        wanted = ipaddress.IPv4Address(address)
    except ValueError:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _, name in socket.if_nameindex():
                request = struct.pack(f"{_IFREQ_SIZE}s", name.encode()[:15])
                try:
                    reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
                except OSError:  # no IPv4 address on it
                    continue
                if ipaddress.IPv4Address(reply[20:24]) == wanted:
                    return name
    except OSError:  # no socket or no interface list (a sandbox): unknown, never fatal
        return None
    return None


def link_speed(name: str, sys_net: Path = SYS_NET) -> float | None:
    """Interface `name`'s link speed in bytes/s, or None if the kernel does not know it."""
    try:
        mbit = int((sys_net / name / "speed").read_text().strip())
    except (OSError, ValueError):  # loopback and many virtual NICs: EINVAL on read
        return None
    return mbit * 1e6 / 8 if mbit > 0 else None  # -1: unknown (link down, no driver figure)


def uplink_of(address: str, sys_net: Path = SYS_NET) -> float | None:
    """Bytes/s the interface holding `address` carries, or None if unknown."""
    name = interface_of(address)
    return None if name is None else link_speed(name, sys_net)
