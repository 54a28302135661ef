"""An image server for the image tests: Range requests, dropped connections, failures.

``ImageResource`` serves one image (``bytes``, or any object with ``len`` and slicing such as
``RepeatedData``) through a pull producer, so large images stream with TCP backpressure. It
records each request's method, Range and Authorization headers.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.interfaces import IPullProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_PIECE = 256 * 1024


class RepeatedData:
    """``size`` bytes made of ``block`` repeated: a large image without the memory."""

    def __init__(self, block: bytes, size: int) -> None:
        self.block, self.size = block, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item: slice) -> bytes:
        start, stop, _ = item.indices(self.size)
        out = []
        while start < stop:
            offset = start % len(self.block)
            piece = self.block[offset:offset + (stop - start)]
            out.append(piece)
            start += len(piece)
        return b"".join(out)


@implementer(IPullProducer)
class _Sender:
    def __init__(self, request: Request, data: Any, start: int, stop: int,
                 cut: int | None, stall: bool = False) -> None:
        self.request, self.data, self.pos, self.stop, self.cut = request, data, start, stop, cut
        self.stall = stall

    def resumeProducing(self) -> None:
        end = min(self.pos + _PIECE, self.stop, self.cut if self.cut is not None else self.stop)
        if self.pos < end:
            self.request.write(self.data[self.pos:end])
            self.pos = end
        if self.cut is not None and self.pos >= self.cut:
            self.request.unregisterProducer()
            if not self.stall:  # a stall keeps the connection open, silent
                self.request.channel.transport.abortConnection()  # type: ignore[union-attr]
        elif self.pos >= self.stop:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.pos = self.stop


class ImageResource(Resource):
    """Serves ``data`` at any path.

    ``cuts``: image offsets at which successive responses drop the connection (each once);
    ``stalls``: the same, but the connection stays open and silent.
    ``ranges``: honour Range requests (else answer 200 with everything). ``fail``: HTTP
    status codes answered by the first requests, in order. ``after_first``: the data served
    from the second request on (a server that changes its bytes). ``basic_auth``: a
    ``(user, password)`` every request must carry as HTTP basic auth (else 401).
    """

    isLeaf = True

    def __init__(self, data: Any, *, cuts: list[int] | None = None, ranges: bool = True,
                 fail: list[int] | None = None, after_first: Any = None,
                 stalls: list[int] | None = None,
                 basic_auth: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.basic_auth = basic_auth
        self.data = data
        self.cuts = list(cuts or [])
        self.stalls = list(stalls or [])
        self.ranges = ranges
        self.fail = list(fail or [])
        self.after_first = after_first
        self.requests: list[dict[str, str | None]] = []

    def render_GET(self, request: Request) -> Any:
        header = request.getHeader("range")
        self.requests.append({"range": header,
                              "authorization": request.getHeader("authorization"),
                              "path": request.path.decode(),
                              "method": request.method.decode()})
        if self.basic_auth is not None:
            user, password = self.basic_auth
            if (request.getUser(), request.getPassword()) != (user.encode(),
                                                             password.encode()):
                request.setResponseCode(401)
                request.setHeader("www-authenticate", 'Basic realm="images"')
                return b"authentication required"
        if self.fail:
            request.setResponseCode(self.fail.pop(0))
            return b"failure"
        data = self.data if len(self.requests) == 1 or self.after_first is None else \
            self.after_first
        size = len(data)
        start, stop = 0, size
        match = _RANGE.match(header or "") if self.ranges else None
        if match:
            start = int(match.group(1))
            stop = min(size, int(match.group(2)) + 1) if match.group(2) else size
            if start >= size:
                request.setResponseCode(416)
                request.setHeader("content-range", f"bytes */{size}")
                return b""
            request.setResponseCode(206)
            request.setHeader("content-range", f"bytes {start}-{stop - 1}/{size}")
        request.setHeader("content-length", str(stop - start))
        request.setHeader("content-type", "application/octet-stream")
        if self.ranges:
            request.setHeader("accept-ranges", "bytes")
        cut, stall = None, False
        if self.cuts and start < self.cuts[0] < stop:
            cut = self.cuts.pop(0)
        elif self.stalls and start < self.stalls[0] < stop:
            cut, stall = self.stalls.pop(0), True
        sender = _Sender(request, data, start, stop, cut, stall)
        request.registerProducer(sender, False)
        return NOT_DONE_YET


def serve(test: Any, resource: Resource) -> int:
    """Serve ``resource`` on a free port of 127.0.0.1 for ``test``'s length; return the port.

    At the test's end the port stops listening and the connections still open are aborted
    and waited for: a VM's user network (QEMU) may keep a download's connection open after
    the guest is gone, which trial would report as a dirty reactor.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.protocols.policies import WrappingFactory
    from twisted.web.server import Site

    from tests.processes import sleep

    factory = WrappingFactory(Site(resource))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]

    async def close() -> None:
        await port.stopListening()
        for protocol in list(factory.protocols):
            protocol.transport.abortConnection()
        for _ in range(100):                    # connectionLost comes on a later turn
            if not factory.protocols:
                return
            await sleep(0.05)

    test.addCleanup(lambda: Deferred.fromCoroutine(close()))
    return int(port.getHost().port)
