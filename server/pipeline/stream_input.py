"""The bytes of a streamed video on their way to the decoder: which layout they have, and the pipe
(or, for an MP4 with its index at the end, the bounded file) they go through.

A decode worker reads a stream from a named pipe (`PipeFeed`) as a file that can be read once,
start to end: the kernel's pipe buffer (64 KB) is the only buffer between the gRPC receiver and
the demuxer, so a decoder that falls behind stops the receiver, which stops reading the RPC, and
gRPC's flow control stops the sender.

MPEG-TS, fragmented MP4, Matroska/WebM and raw H.264 decode as they arrive. A regular MP4 whose
`moov` (the index) follows its `mdat` (the media) cannot be decoded before its last byte:
`Mp4Layout` sees that from the top-level box headers, and the stream is then written to a
`SpillFile` (at most limits.max_upload_bytes) and decoded when the upload ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pathlib
import tempfile
from enum import Enum

from server.errors import TooLarge

# Top-level MP4 boxes read before the layout is decided regardless (huge `free` or `uuid` boxes):
# past this the stream is passed through, and the demuxer says what it can do with it.
MP4_LAYOUT_BYTES = 1 << 20
# How often a stream's first write checks whether its decode worker has opened the pipe.
PIPE_CONNECT_POLL_S = 0.005
REMUX_HINT = "remux it as fragmented MP4 (ffmpeg -i IN -c copy -movflags frag_keyframe+empty_moov OUT.mp4)"


_LARGE_SIZE = (1).to_bytes(4, "big")  # a box size of 1: the real size is the 64 bits after the type


class Layout(Enum):
    UNDECIDED = "undecided"
    STREAMABLE = "streamable"  # not MP4, or an MP4 whose index comes first (fragmented or faststart)
    INDEX_AT_END = "index_at_end"


class Mp4Layout:
    """Walks the top-level box headers of a stream's first bytes, keeping no more than one header:
    `moov` or `moof` before `mdat` is streamable, `mdat` first is not. A stream that does not start
    with an `ftyp` box is not MP4, and streamable."""

    def __init__(self) -> None:
        self.layout = Layout.UNDECIDED
        self._fed = 0  # bytes fed so far
        self._box = 0  # offset of the box header being read
        self._header = b""

    def feed(self, data: bytes) -> Layout:
        base, i = self._fed, 0
        self._fed += len(data)
        while self.layout is Layout.UNDECIDED:
            i = max(i, self._box + len(self._header) - base)
            if i >= len(data):
                break
            large = len(self._header) >= 8 and self._header[:4] == _LARGE_SIZE
            want = 16 if large else 8
            self._header += data[i:i + want - len(self._header)]
            if len(self._header) == 8 and self._header[:4] == _LARGE_SIZE:
                continue  # the 64-bit size follows the type
            if len(self._header) == want:
                self._next_box()
        if self.layout is Layout.UNDECIDED and self._fed > MP4_LAYOUT_BYTES:
            self.layout = Layout.STREAMABLE
        return self.layout

    def _next_box(self) -> None:
        header, self._header = self._header, b""
        size, kind = int.from_bytes(header[:4], "big"), header[4:8]
        if size == 1:
            size = int.from_bytes(header[8:16], "big")
        if self._box == 0 and kind != b"ftyp":
            self.layout = Layout.STREAMABLE
        elif kind in (b"moov", b"moof"):
            self.layout = Layout.STREAMABLE
        elif kind == b"mdat":
            self.layout = Layout.INDEX_AT_END
        elif size < len(header):  # 0 (up to the end) or invalid: nothing further to walk
            self.layout = Layout.STREAMABLE
        else:
            self._box += size

    def finish(self) -> Layout:
        """The layout at the end of a stream too short to decide: streamable (the demuxer judges)."""
        if self.layout is Layout.UNDECIDED:
            self.layout = Layout.STREAMABLE
        return self.layout


class PipeFeed:
    """A named pipe in `directory` that a decode worker opens by path and the gateway writes into
    without blocking its event loop.

    The write end is opened only once the reader has the pipe open (until then a write waits):
    bytes written before would be lost if the writer closed first, and a reader that opens a pipe
    without a writer waits forever. `close()` gives the reader end-of-file; `abort()` also wakes
    one still waiting to open it and removes the path, so a reader that comes later fails at once."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="stream-", dir=directory))
        self.path = self.directory / "video"
        os.mkfifo(self.path, 0o600)
        self._fd: int | None = None
        self._closed = False
        self.written = 0
        self.reader_gone = False  # the decoder closed its end before the stream ended

    async def _connect(self) -> int:
        while self._fd is None:
            if self._closed:
                raise RuntimeError("the pipe is closed")
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                await asyncio.sleep(PIPE_CONNECT_POLL_S)
        return self._fd

    async def write(self, data: bytes | memoryview) -> None:
        """Write all of `data`, waiting (not blocking the loop) for the reader and while the pipe
        is full. Once the reader is gone (the decoder stopped early) the rest is discarded."""
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        fd = await self._connect()
        while view and not self.reader_gone:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                await self._writable(loop, fd)
                continue
            except BrokenPipeError:
                self.reader_gone = True
                return
            view = view[n:]
            self.written += n

    @staticmethod
    async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
        ready = loop.create_future()
        loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_writer(fd)

    def close(self) -> None:
        """The end of the stream: the reader gets end-of-file after the bytes written."""
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        """Stop now: a reader gets end-of-file, one blocked opening the pipe too, and one that
        comes later finds no pipe (instead of waiting for a writer forever)."""
        connected = self._fd is not None
        self.close()
        if not connected:  # a writer that leaves at once wakes a reader waiting to open
            with contextlib.suppress(OSError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        with contextlib.suppress(OSError):
            self.path.unlink()

    def remove(self) -> None:
        self.abort()
        with contextlib.suppress(OSError):
            self.directory.rmdir()


class SpillFile:
    """A stream written to a temporary file, refused past `max_bytes` with the remedy named."""

    def __init__(self, directory: pathlib.Path, max_bytes: int) -> None:
        fd, name = tempfile.mkstemp(prefix="stream-", suffix=".mp4", dir=directory)
        self.path = pathlib.Path(name)
        self._file = os.fdopen(fd, "wb")
        self.max_bytes = max_bytes
        self.written = 0

    async def write(self, data: bytes) -> None:
        if self.written + len(data) > self.max_bytes:
            raise TooLarge(
                f"this MP4 has its index (moov) at the end, so it cannot be analysed before its "
                f"last byte and is held on disk meanwhile, up to {self.max_bytes} bytes "
                f"(limits.max_upload_bytes); it is longer: {REMUX_HINT} to stream it"
            )
        await asyncio.to_thread(self._file.write, data)
        self.written += len(data)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
