"""The pool of decode worker processes: start, hand out, take back, recycle and replace them.
What a worker does for a request is scheduled elsewhere (`decode.SegmentScheduler`).

A worker is a plain subprocess (not multiprocessing's spawn, so the parent's __main__ is never
re-imported) talking `decode_protocol` messages over a socket pair; a thread per worker reads its
messages and queues them on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from server.errors import Timeout, VqsError
from server.pipeline import _decode_worker as worker_module
from server.pipeline import decode_protocol as msg
from server.triton import SharedFrames

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Died:
    """Put in a worker's inbox (by the parent) when its pipe closes."""


Inbox = tuple[msg.FromWorker | Died, np.ndarray | None]  # a message and, for `Frames`, its frames


class WorkerDied(Exception):
    pass


class WorkerProcess:
    """One decode process, its pipe, and a thread that forwards its messages to the loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, name: str, frames_memory: SharedFrames | None = None
    ) -> None:
        self.loop = loop
        self.name = name
        self.frames_memory = frames_memory  # where chunks are copied to, when it has a slot free
        self.inbox: asyncio.Queue[Inbox] = asyncio.Queue()
        self.jobs = 0  # videos worked on
        self.rss_mb = 0.0
        # Run on the loop when the worker finishes a segment (before the consumer sees it).
        self.on_segment_done: Callable[[WorkerProcess], None] | None = None
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", worker_module.__name__, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.arena = np.zeros(0, np.uint8)  # the worker's frames (`msg.Arena`); read by the reader thread only
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                m = self.conn.recv()
                if isinstance(m, msg.Arena):
                    fd = msg.recv_fd(self.conn)
                    try:
                        self.arena = msg.map_arena(fd, m.nbytes)
                    finally:
                        os.close(fd)
                    continue
                payload = None
                if isinstance(m, msg.Frames):  # copied out, so the worker may fill its slot again
                    payload = self._copy_out(self.arena[m.offset : m.offset + m.nbytes])
            except (EOFError, OSError, ValueError):
                self._deliver(Died(), None)
                return
            self._deliver(m, payload)

    def _copy_out(self, frames: np.ndarray) -> np.ndarray:
        slot = None if self.frames_memory is None else self.frames_memory.take(frames.nbytes)
        if slot is None:
            return frames.copy()
        np.copyto(slot, frames)
        return slot

    def _deliver(self, m: msg.FromWorker | Died, payload: np.ndarray | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self._on_message, m, payload)
        except RuntimeError:  # loop closed
            pass

    def _on_message(self, m: msg.FromWorker | Died, payload: np.ndarray | None) -> None:
        if isinstance(m, msg.SegmentDone) and self.on_segment_done is not None:
            self.on_segment_done(self)
        self.inbox.put_nowait((m, payload))

    def send(self, m: msg.ToWorker) -> None:
        """To a worker that has died this does nothing: its `Died` reaches the inbox instead, so the
        request fails with the crash and not with the broken pipe that the send would raise."""
        with self._send_lock, contextlib.suppress(OSError):
            self.conn.send(m)

    async def recv(self, timeout: float) -> Inbox:
        # Not asyncio.wait_for: on Python 3.11 it returns the message and swallows a cancellation
        # that arrives as the message does, so a cancelled request kept decoding (and encoding).
        try:
            async with asyncio.timeout(timeout):
                return await self.inbox.get()
        except TimeoutError:
            raise Timeout(f"video decoder produced nothing for {timeout:g} s") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.conn.close()


class WorkerPool:
    """`size` decode processes; a worker that died is replaced, one past `recycle_after` videos
    or `recycle_rss_mb` of memory (decord leaks) is recycled when it is handed back."""

    def __init__(
        self,
        size: int,
        *,
        start_timeout_s: float,
        release_timeout_s: float,
        recycle_after: int,
        recycle_rss_mb: float,
        frames_memory: SharedFrames | None = None,
    ) -> None:
        self.size = size
        self.frames_memory = frames_memory
        self.start_timeout_s = start_timeout_s
        self.release_timeout_s = release_timeout_s
        self.recycle_after = recycle_after
        self.recycle_rss_mb = recycle_rss_mb
        self._idle: asyncio.Queue[WorkerProcess] | None = None
        self._all: set[WorkerProcess] = set()
        self._tasks: set[asyncio.Task] = set()
        self._serial = 0
        self._closed = False

    @property
    def started(self) -> bool:
        return self._idle is not None

    def idle_count(self) -> int:
        return 0 if self._idle is None else self._idle.qsize()

    def pids(self) -> list[int]:
        return [w.pid for w in self._all]

    async def start(self) -> None:
        if self._idle is not None:
            return
        self._idle = asyncio.Queue()
        await asyncio.gather(*(self._spawn() for _ in range(self.size)))

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for w in list(self._all):
            w.send(msg.Exit())
        for w in list(self._all):
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(w.proc.wait, 3)
            w.kill()
        self._all.clear()
        self._idle = None

    async def acquire(self) -> WorkerProcess:
        if self._idle is None:
            raise RuntimeError("the decode pool was not started")
        while True:
            w = await self._idle.get()
            if self._usable(w):
                return w

    def try_acquire(self) -> WorkerProcess | None:
        while self._idle is not None and not self._idle.empty():
            w = self._idle.get_nowait()
            if self._usable(w):
                return w
        return None

    async def release(self, w: WorkerProcess) -> None:
        """Stop whatever `w` does for a request, then return it to the pool (or recycle it)."""
        w.on_segment_done = None
        try:
            w.send(msg.Release())
            while True:
                m, _ = await w.recv(self.release_timeout_s)
                if isinstance(m, msg.Released):
                    w.rss_mb = m.rss_mb
                    break
                if isinstance(m, Died):
                    raise WorkerDied()
        except (VqsError, WorkerDied):
            self.replace(w)
            return
        w.inbox = asyncio.Queue()
        if w.jobs >= self.recycle_after or w.rss_mb > self.recycle_rss_mb:
            logger.info("recycling %s after %d videos (rss %.0f MB)", w.name, w.jobs, w.rss_mb)
            w.send(msg.Exit())
            self.replace(w)
        elif self._idle is not None and not self._closed:
            self._idle.put_nowait(w)
        else:
            w.kill()

    def replace(self, w: WorkerProcess) -> None:
        """Kill `w` and start a new worker in its place (in the background)."""
        self._all.discard(w)
        w.kill()
        if not self._closed:
            task = asyncio.get_running_loop().create_task(self._spawn_logged())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _spawn(self) -> None:
        self._serial += 1
        loop = asyncio.get_running_loop()
        w = await asyncio.to_thread(WorkerProcess, loop, f"vqs-decode-{self._serial}", self.frames_memory)
        self._all.add(w)
        try:
            m, _ = await w.recv(self.start_timeout_s)
            if not isinstance(m, msg.Ready):
                raise WorkerDied(f"decode worker failed to start: {m}")
        except BaseException:
            self._all.discard(w)
            w.kill()
            raise
        if self._closed or self._idle is None:
            w.kill()
            return
        self._idle.put_nowait(w)

    async def _spawn_logged(self) -> None:
        try:
            await self._spawn()
        except Exception:
            logger.exception("could not start a decode worker")

    def _usable(self, w: WorkerProcess) -> bool:
        """False (and the worker replaced) if it died while idle."""
        if w.proc.poll() is None and w.inbox.empty():
            return True
        self.replace(w)
        return False
