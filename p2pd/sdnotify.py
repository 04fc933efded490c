"""systemd's readiness protocol (sd_notify), without libsystemd.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a unix datagram socket path; a leading
``@`` means the abstract namespace) and waits for ``READY=1`` before it considers the service
started -- so units ordered after ours start only once we listen. ``STOPPING=1`` says a stop is
under way, ``RELOADING=1`` a reload. Outside systemd (no ``NOTIFY_SOCKET``) every call is a
no-op, so the daemons call it unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. ``"READY=1"``) to systemd; True if there was a socket to send to."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", path, exc)
        return False
    return True
