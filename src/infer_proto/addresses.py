"""What an address means on this host: shared by the server (which addresses need TLS) and the
client library (which targets may use the tmpfs handoff). Standard library only: the server's
settings import it before grpc is imported."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1), bracketed or not."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
