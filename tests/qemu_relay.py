"""Relay one guest connection to a TCP server on the host's loopback: QEMU's ``guestfwd``.

QEMU runs ``python3 tests/qemu_relay.py HOST PORT`` for each connection the guest opens to
the forwarded address, with the connection on the relay's standard input and output. This
is a child of QEMU, not of the test's reactor, so it may block.
"""

from __future__ import annotations

import os
import select
import socket
import sys


def relay(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=30) as upstream:
        upstream.settimeout(None)
        sources = [0, upstream.fileno()]
        while sources:
            readable, _, _ = select.select(sources, [], [], 300)
            if not readable:
                return                                    # idle for five minutes
            for fd in readable:
                if fd == 0:
                    data = os.read(0, 65536)
                    if not data:
                        upstream.shutdown(socket.SHUT_WR)
                        sources.remove(0)
                    else:
                        upstream.sendall(data)
                else:
                    data = upstream.recv(65536)
                    if not data:
                        return
                    view = memoryview(data)
                    while view:
                        view = view[os.write(1, view):]


if __name__ == "__main__":
    relay(sys.argv[1], int(sys.argv[2]))
