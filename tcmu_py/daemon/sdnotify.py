"""systemd's readiness protocol (sd_notify(3)), without libsystemd: one datagram of
``KEY=VALUE`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract
name written with a leading ``@``). The unit is ``Type=notify``: `tcmu-py serve` sends
``READY=1`` once every present device is served and the YAML's LIO objects exist, so
``Before=target.service`` means "devices are served"; ``STOPPING=1`` when it shuts down."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not started by systemd (no
    ``$NOTIFY_SOCKET``) or when the send fails (logged: systemd then times the unit out)."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r: expected a path or @abstract name; not notified", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify %s to %r failed: %s", state, env["NOTIFY_SOCKET"], exc)
        return False
    return True
