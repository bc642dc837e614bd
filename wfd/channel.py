"""One client connection: framed reads and writes under deadlines and byte budgets.

Nothing a client sends or fails to read can hurt the daemon or other clients:

- a frame's length is checked against the 16 MiB limit before its body is
  read; a body up to `SMALL_FRAME` is read straight away (each connection
  holds at most one), a larger one first waits for its share of `BUDGET`, the
  bytes of large bodies in flight across all clients;
- every read has a deadline: `IDLE_TIMEOUT` for a frame to begin, then
  `FRAME_TIMEOUT` for the rest of it, so a client that sends nothing or a
  byte a second costs one connection for a bounded time;
- replies are sent a frame at a time: the next frame of a reply is made only
  once the kernel has taken every byte of the last one, so a connection holds
  at most one frame, and a frame over `SMALL_REPLY` first waits for its share
  of `REPLY_BUDGET`. A reply that is long (a list of 100,000 runs, a replay of
  a big run) is made and sent a part at a time (`send_parts`), each part made
  only once its budget is held (`reserve`): a connection waiting for its turn
  holds nothing but its place, and a reply's size never shows in the daemon's
  memory;
- a client that takes none of its replies' bytes for `WRITE_TIMEOUT` is cut
  off and what was buffered for it dropped. A slow reader that makes progress
  is never cut off: that is backpressure, not a deadline per frame;
- a frame that is oversize, not msgpack, not an envelope, of another protocol
  version, an unknown or malformed message gets an `Error` and the connection
  is closed.

Both budgets are granted in arrival order, with a share per user (`Budget`):
one user's connections hold at most `BUDGET_SHARE` / `REPLY_SHARE` of them,
so a member who announces 16 MiB frames on 25 connections and sends them
slowly, or pipelines requests for huge replies that it never reads, waits for
its own bytes and not for anyone else's. Root and the daemon's own user have
no share: they are whom the daemon serves.

Memory for clients' requests and replies is thus at most about BUDGET + 2 x
REPLY_BUDGET (a frame, and the transport's copy of what the kernel has not
taken yet) + connections x (SMALL_FRAME + 3 x READ_LIMIT + 2 x SMALL_REPLY),
whatever clients do (with the defaults, 192 MiB + 1024 x 240 KiB). Measured:
127 connections of one member asking for a 3 MB status and reading nothing
grew the daemon by 16 MiB (1.2 GB before replies were budgeted).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import select
import struct
import termios
from collections.abc import Awaitable, Iterator
from typing import Any

import msgspec

from wfd import protocol as p
from wfd.errors import EXIT_UNREACHABLE, EXIT_USAGE

IDLE_TIMEOUT = 300.0  # a connection that begins no frame for this long is closed
FRAME_TIMEOUT = 10.0  # the rest of a frame must arrive within this once it began
WRITE_TIMEOUT = 60.0  # a client that takes none of its replies' bytes this long is cut off
DRAIN_POLL = 1.0  # how often a blocked reply checks that its client takes bytes at all
BUDGET_WAIT = 5.0  # a large frame waits this long for budget, then is answered "busy"
BUDGET = 64 * 1024 * 1024  # bytes of large frame bodies being read, across all clients
BUDGET_SHARE = 16 * 1024 * 1024  # of which one user's connections may hold (a frame's max)
SMALL_FRAME = 64 * 1024  # bodies up to this size are read without the budget
READ_LIMIT = 16 * 1024  # what a connection buffers ahead of what its handler reads
READ_CHUNK = 256 * 1024  # one read of a large body, once it has its budget
REPLY_BUDGET = 64 * 1024 * 1024  # bytes of reply frames being sent, across all clients
REPLY_SHARE = 8 * 1024 * 1024  # of which one user's connections may hold
SMALL_REPLY = 64 * 1024  # reply frames up to this size are sent without the budget
PART_RESERVE = p.PART_SIZE + 64 * 1024  # budget taken before a part is made: a part's size


class Close(Exception):
    """End this connection (what had to be said was sent)."""


class Budget:
    """Bytes in flight, across all clients, granted in arrival order, with a share per
    user: a waiter that would take its user over `share` waits for that user's own bytes
    to come back (and so do that user's later waiters, so they keep their order), and
    lets everyone behind it go first. Nobody is overtaken forever: the global budget goes
    strictly in arrival order among those within their share. Key None: no share."""

    def __init__(self, total: int, share: int | None = None) -> None:
        self.total = total
        self.share = total if share is None else share
        self.free = total
        self.used: collections.Counter[int] = collections.Counter()
        self.waiters: collections.deque[tuple[int, int | None, asyncio.Future]] = (
            collections.deque())

    async def acquire(self, size: int, timeout: float, key: int | None = None) -> bool:
        """Take `size` bytes for `key` (a uid, or None); False if they were not free
        within `timeout` seconds."""
        if size > (self.total if key is None else self.share):
            raise ValueError(f"{size} bytes is more than a whole share of the budget")
        future = asyncio.get_running_loop().create_future()
        entry = (size, key, future)
        self.waiters.append(entry)
        self._grant()
        if future.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except BaseException as exc:  # timed out, or the connection is being cancelled
            if future.done():  # granted just as we gave up: give it back
                self.release(size, key)
            else:
                future.cancel()
                self.waiters.remove(entry)
                self._grant()  # this one may have been the head, holding others back
            if isinstance(exc, asyncio.TimeoutError):
                return False
            raise
        return True

    def release(self, size: int, key: int | None = None) -> None:
        self.free += size
        if key is not None:
            self.used[key] -= size
            if not self.used[key]:
                del self.used[key]
        self._grant()

    def _grant(self) -> None:
        over_share: set[int] = set()
        for entry in list(self.waiters):
            size, key, future = entry
            if key is not None and (key in over_share or self.used[key] + size > self.share):
                over_share.add(key)
                continue
            if size > self.free:
                return
            self.waiters.remove(entry)
            self.free -= size
            if key is not None:
                self.used[key] += size
            future.set_result(None)


class Channel:
    """One client connection: framed reads and writes under their deadlines and budgets.
    `key` is the budget share the connection draws on (its uid, or None for no share)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 requests: Budget, replies: Budget) -> None:
        self.reader = reader
        self.writer = writer
        self.requests = requests
        self.replies = replies
        self.key: int | None = None
        self.reserved = 0  # reply budget taken for the next frame, before it was made
        self._read_ahead(READ_LIMIT)
        # drain() waits until the kernel has taken every byte: one frame in flight at most
        writer.transport.set_write_buffer_limits(high=0)

    def _read_ahead(self, size: int) -> None:
        """How much one recv() may take in: asyncio's selector transport reads 256 KiB at
        a time whatever the reader's limit, which for a thousand connections that send
        more than they are asked for would be 256 MiB nobody budgeted."""
        if hasattr(self.writer.transport, "max_size"):
            self.writer.transport.max_size = size  # type: ignore[attr-defined]

    # ---- writing ---------------------------------------------------------------------

    async def send(self, msg: p.Message) -> None:
        """Send one message (in Fragments if it is bigger than a fragment); returns once
        the kernel has taken it all, so the caller makes the next one only then."""
        for frame in p.encode_frames(msg):
            await self._send_frame(frame)

    async def __call__(self, msg: p.Message) -> None:
        """Handlers get the connection as their `send`."""
        await self.send(msg)

    async def send_parts(self, parts: Iterator[p.Message]) -> None:
        """Send the messages `parts` makes, each made only once the budget for it is
        held: a connection waiting for its turn holds no reply, only its place."""
        while True:
            await self.reserve()
            msg = next(parts, None)
            if msg is None:
                break
            await self.send(msg)
        self.unreserve()

    async def reserve(self) -> None:
        """Take PART_RESERVE of the reply budget for the next frame, which is about to be
        made (its items read or encoded); the frame's send gives it back."""
        if self.reserved:
            return
        if not await self.replies.acquire(PART_RESERVE, WRITE_TIMEOUT, self.key):
            await self._busy()
        self.reserved = PART_RESERVE

    def unreserve(self) -> None:
        if self.reserved:
            self.replies.release(self.reserved, self.key)
            self.reserved = 0

    async def _busy(self) -> None:
        # an Error is small: it needs no budget
        await self.error(EXIT_UNREACHABLE, "wfd is busy sending other replies; try again")
        raise Close

    async def error(self, code: int, message: str) -> None:
        await self.send(p.Error(code, message))

    async def _send_frame(self, frame: bytes) -> None:
        held, self.reserved = self.reserved, 0
        more = len(frame) - held if len(frame) > SMALL_REPLY else 0
        if more > 0 and not await self.replies.acquire(more, WRITE_TIMEOUT, self.key):
            self.replies.release(held, self.key)
            await self._busy()
        try:
            self.writer.write(frame)
            del frame
            await self._drained()
        finally:
            if held + max(more, 0):
                self.replies.release(held + max(more, 0), self.key)

    async def _drained(self) -> None:
        """Wait until the kernel took the buffered bytes; a client that reads none of what
        we sent for WRITE_TIMEOUT is cut off, one that reads some, however slowly, is not."""
        least = self._unread()
        since = _now()
        while True:
            try:
                await asyncio.wait_for(self.writer.drain(), min(DRAIN_POLL, WRITE_TIMEOUT / 4))
                return
            except asyncio.TimeoutError:
                unread = self._unread()
                if unread < least:
                    least, since = unread, _now()
                elif _now() - since >= WRITE_TIMEOUT:
                    self.writer.transport.abort()  # drop what it did not read
                    raise ConnectionError("client does not read its replies") from None

    def _unread(self) -> int:
        """Bytes sent that the client has not read: ours, and the kernel's (SIOCOUTQ),
        which goes down as the client reads; our buffer only when the kernel's is
        three quarters empty."""
        unread = self.writer.transport.get_write_buffer_size()
        sock = self.writer.get_extra_info("socket")
        try:
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
            unread += struct.unpack("i", queued)[0]
        except (OSError, ValueError):
            pass
        return unread

    def gone(self) -> bool:
        """The client closed its end for good (not just its writing half): a stream
        waiting for news need not wait any longer."""
        if self.writer.is_closing():
            return True
        sock = self.writer.get_extra_info("socket")
        poller = select.poll()
        poller.register(sock.fileno(), 0)  # POLLHUP and POLLERR are always reported
        return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))

    async def close(self, clean: bool) -> None:
        """Close; a clean close delivers what is buffered, within WRITE_TIMEOUT."""
        self.unreserve()
        if not clean:
            self.writer.transport.abort()
            return
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), WRITE_TIMEOUT)
        except (asyncio.TimeoutError, OSError):
            self.writer.transport.abort()

    # ---- reading ---------------------------------------------------------------------

    async def request(self) -> p.Message | None:
        """The next request, or None at a clean end of the connection. A bad frame is
        answered with an Error and raises Close."""
        first = await asyncio.wait_for(self.reader.read(1), IDLE_TIMEOUT)
        if not first:
            return None
        deadline = _now() + FRAME_TIMEOUT
        try:
            length = p.frame_length(first + await _within(self.reader.readexactly(3), deadline))
            if length > p.MAX_FRAME:
                await self.error(EXIT_USAGE, f"frame of {length} bytes is over the "
                                             f"{p.MAX_FRAME} byte limit")
                raise Close
            if length <= SMALL_FRAME:
                body = await _within(self.reader.readexactly(length), deadline)
                return await self._decode(body)
            return await self._large(length)
        except asyncio.TimeoutError:
            await self.error(EXIT_USAGE, f"frame not complete within {FRAME_TIMEOUT:g} s "
                                         "of its first byte; closing")
            raise Close from None

    async def _large(self, length: int) -> p.Message:
        if not await self.requests.acquire(length, BUDGET_WAIT, self.key):
            await self.error(EXIT_UNREACHABLE, "wfd is busy reading other large requests; "
                                               "try again")
            raise Close
        self._read_ahead(READ_CHUNK)
        try:
            body = await self._read_into(length, _now() + FRAME_TIMEOUT)
            return await self._decode(body)  # the body is dropped before the budget returns
        finally:
            self._read_ahead(READ_LIMIT)
            self.requests.release(length, self.key)

    async def _read_into(self, length: int, deadline: float) -> bytearray:
        """Read a body into one buffer of its size (readexactly would hold it twice)."""
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        try:
            while got < length:
                chunk = await _within(self.reader.read(min(READ_CHUNK, length - got)), deadline)
                if not chunk:
                    raise asyncio.IncompleteReadError(bytes(view[:got]), length)
                view[got:got + len(chunk)] = chunk
                got += len(chunk)
        finally:
            view.release()
        return body

    async def _decode(self, body: bytes | bytearray) -> p.Message:
        try:
            return p.decode_request(body)
        except p.VersionMismatch as exc:
            await self.error(EXIT_UNREACHABLE, f"wfd speaks protocol {p.PROTOCOL}, this "
                                               f"{p.peer_name(body)} speaks {exc.theirs}")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self.error(EXIT_USAGE, f"bad request: {exc}")
        raise Close


def _now() -> float:
    return asyncio.get_running_loop().time()


async def _within(awaitable: Awaitable, deadline: float) -> Any:
    return await asyncio.wait_for(awaitable, max(0.0, deadline - _now()))
