"""Whether a TCP port is free on this host: nothing bound to it, on any address."""

from __future__ import annotations

import errno
import socket


def free_on_host(port: int) -> bool:
    """Bind the port on every IPv4 and IPv6 address, and let it go: refused means something
    (a listening server, a bound client) has it. No ``SO_REUSEADDR``: a port left in
    ``TIME_WAIT`` by a server that just stopped counts as taken too."""
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for family, address in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EAFNOSUPPORT:
                continue  # no IPv6 here
            return False
    return True
