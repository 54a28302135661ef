"""Compressed raw images undone on the stream, with bounded output per step.

gzip, bzip2 and xz are undone in-process (zlib, bz2, lzma) in the pipeline's writer thread;
each step yields at most ``OUTPUT_STEP`` bytes, so a highly compressed image (a mostly empty
disk) never expands in memory. Concatenated members/streams are followed, as ``gzip -dc``,
``bzcat`` and ``xz -dc`` do; zero padding after the last one is ignored. zstd goes through the
``zstd -dc`` program instead (``pipeline``): the standard library has no zstd before 3.14.

The content of a compressed image must be raw (or ISO): a compressed qcow2 is refused by
``formats.check_safe`` once the first decompressed bytes are known, before anything is
written (qcow2's own compression is supported).
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Iterator
from typing import Any

from ipa_twisted import errors
from ipa_twisted.images.formats import BZIP2, GZIP, XZ
from ipa_twisted.blockdev.writer import SequentialSink

OUTPUT_STEP = 4 * 1024 * 1024


def _new(kind: str) -> Any:
    if kind == GZIP:
        return zlib.decompressobj(wbits=47)  # gzip or zlib header, told apart automatically
    if kind == BZIP2:
        return bz2.BZ2Decompressor()
    if kind == XZ:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    raise ValueError(f"no in-process decompressor for {kind}")


class Decompressor:
    """Undo ``kind`` (gzip, bzip2, xz) on a stream, ``OUTPUT_STEP`` bytes at a time."""

    def __init__(self, kind: str, image_id: str = "") -> None:
        self.kind, self.image_id = kind, image_id
        self._d = _new(kind)
        self._ended = False     # the current member is complete
        self._members = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def _error(self, message: str) -> errors.ImageDownloadError:
        return errors.ImageDownloadError(self.image_id, f"{self.kind} decompression failed: "
                                                        f"{message}")

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decompressed bytes for the next compressed ``data``."""
        self.bytes_in += len(data)
        while data:
            if self._ended:
                if not data.strip(b"\0"):
                    return  # padding after the last member
                self._d, self._ended = _new(self.kind), False
            try:
                yield from self._step(data)
            except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as e:
                raise self._error(str(e)) from e
            data = self._d.unused_data if self._ended else b""

    def _step(self, data: bytes) -> Iterator[bytes]:
        d = self._d
        if self.kind == GZIP:
            out = d.decompress(data, OUTPUT_STEP)
            while True:
                if out:
                    self.bytes_out += len(out)
                    yield out
                if d.eof or not d.unconsumed_tail:
                    break
                out = d.decompress(d.unconsumed_tail, OUTPUT_STEP)
        else:
            out = d.decompress(data, OUTPUT_STEP)
            while True:
                if out:
                    self.bytes_out += len(out)
                    yield out
                if d.eof or d.needs_input:
                    break
                out = d.decompress(b"", OUTPUT_STEP)
        if d.eof:
            self._ended = True
            self._members += 1

    def finish(self) -> None:
        """The compressed stream ended: fail if it was cut short."""
        if not self._ended:
            raise self._error("the compressed stream is truncated")


class DecompressingSink:
    """A compressed raw image: decompress, then write in order (writer thread only)."""

    def __init__(self, kind: str, sink: SequentialSink, image_id: str = "") -> None:
        self.decompressor = Decompressor(kind, image_id)
        self.sink = sink

    def feed(self, data: bytes) -> None:
        for piece in self.decompressor.feed(data):
            self.sink.feed(piece)

    def finish(self) -> None:
        self.decompressor.finish()
        self.sink.finish()
