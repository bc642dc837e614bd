"""The socket server in-process, with its deadlines shortened: idle, slow and
non-reading clients are cut off on time, large frames share the budget in
arrival order, small requests never wait behind them, connections are capped.

The same behaviour at the real deadlines, through the real binaries, is in
test_socket_hostile.py; these tests check the deadlines themselves, which take
seconds to minutes at their real values.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pytest

from wfd import channel as ch
from wfd import protocol as p
from wfd import server as srv
from wfd import state as st
from wfd.daemon import bind_socket
from wfd.engine import Engine
from wfd.eventlog import Layout
from wfd.workflow import parse_workflow

HEADER = struct.Struct(">I")


def frame(msg: p.Message) -> bytes:
    return p.encode_frame(msg)


async def read_reply(reader: asyncio.StreamReader, timeout: float = 2.0) -> p.Message | None:
    """The next reply, or None when the daemon closed (EOF or reset) first."""
    try:
        header = await asyncio.wait_for(reader.readexactly(4), timeout)
        return p.decode_reply(await asyncio.wait_for(reader.readexactly(p.frame_length(header)),
                                                     timeout))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def closed(reader: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True once the daemon has closed the connection (EOF or reset)."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except ConnectionError:
        pass
    return True


def serve(tmp: Path, scenario: Callable[[srv.Server, str], Awaitable[None]]) -> None:
    """Run `scenario(server, socket_path)` against a Server over an empty state dir."""
    async def main() -> None:
        (tmp / "state" / "runs").mkdir(parents=True)
        engine = Engine(Layout(tmp / "state"), 2, False)
        server = srv.Server(engine, False, None)
        path = tmp / "s.sock"
        listener = await server.serve(bind_socket(path, False, None))
        try:
            await scenario(server, str(path))
        finally:
            listener.close()
            for task in list(server.connections):
                task.cancel()
            await asyncio.sleep(0)

    asyncio.run(asyncio.wait_for(main(), 30))


async def status_round_trip(path: str) -> float:
    """Seconds a fresh client needs for Hello + Status."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(frame(p.Hello(client="probe")) + frame(p.Status()))
    assert isinstance(await read_reply(reader), p.HelloReply)
    assert isinstance(await read_reply(reader), p.RunList)
    writer.close()
    return loop.time() - started


@pytest.fixture
def short_deadlines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ch, "IDLE_TIMEOUT", 0.4)
    monkeypatch.setattr(ch, "FRAME_TIMEOUT", 0.4)
    monkeypatch.setattr(ch, "WRITE_TIMEOUT", 0.4)
    monkeypatch.setattr(ch, "BUDGET_WAIT", 0.4)


def test_idle_connection_is_closed_after_the_idle_deadline(
        tmp_path: Path, short_deadlines: None) -> None:
    async def scenario(server: srv.Server, path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        started = asyncio.get_running_loop().time()
        assert await closed(reader)
        assert 0.3 <= asyncio.get_running_loop().time() - started < 1.5
        assert not server.connections

    serve(tmp_path, scenario)


def test_byte_a_second_client_is_cut_off_while_others_are_served(
        tmp_path: Path, short_deadlines: None) -> None:
    async def scenario(server: srv.Server, path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        data = frame(p.Status())

        async def dribble() -> None:
            for byte in data:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)

        dribbler = asyncio.ensure_future(dribble())
        assert await status_round_trip(path) < 0.3  # served meanwhile
        reply = await read_reply(reader)
        assert isinstance(reply, p.Error) and reply.code == 2
        assert "not complete within 0.4 s" in reply.message
        assert await closed(reader)
        dribbler.cancel()

    serve(tmp_path, scenario)


def test_client_that_never_reads_is_cut_off_and_its_replies_dropped(
        tmp_path: Path, short_deadlines: None) -> None:
    async def scenario(server: srv.Server, path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.transport.set_write_buffer_limits(high=1 << 22)
        writer.write(frame(p.Status()) * 50_000)  # ~1 MiB of replies it will not read
        loop = asyncio.get_running_loop()
        started = loop.time()
        while server.connections and loop.time() - started < 5:
            assert await status_round_trip(path) < 0.3  # served meanwhile
            await asyncio.sleep(0.05)
        assert not server.connections, "the non-reading client is still connected"
        assert loop.time() - started < 3
        writer.transport.abort()

    serve(tmp_path, scenario)


def test_cut_frame_and_garbage_close_only_that_connection(
        tmp_path: Path, short_deadlines: None) -> None:
    async def scenario(server: srv.Server, path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(HEADER.pack(100) + b"x" * 10)
        writer.write_eof()  # cut off midway
        assert await closed(reader)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
        reply = await read_reply(reader)
        assert isinstance(reply, p.Error) and reply.message.startswith("bad request: ")
        assert await closed(reader)
        assert await status_round_trip(path) < 0.3

    serve(tmp_path, scenario)


def test_large_frames_wait_for_budget_small_ones_never_do(
        tmp_path: Path, short_deadlines: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ch, "BUDGET", 4 * ch.SMALL_FRAME)
    # the waiters give up well before the holders are cut off (no race on a busy machine)
    monkeypatch.setattr(ch, "BUDGET_WAIT", 0.2)
    monkeypatch.setattr(ch, "FRAME_TIMEOUT", 0.8)
    size = 2 * ch.SMALL_FRAME

    async def scenario(server: srv.Server, path: str) -> None:
        hogs = []
        for _ in range(6):  # each announces a large body and sends none of it
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(HEADER.pack(size))
            hogs.append((reader, writer))
        await asyncio.sleep(0.1)
        assert server.budget.free == 0  # two got their share; four wait
        assert len(server.budget.waiters) == 4
        assert await status_round_trip(path) < 0.3  # small requests go past them
        replies = [await read_reply(reader) for reader, _ in hogs]
        messages = sorted(r.message for r in replies if isinstance(r, p.Error))
        assert len(messages) == 6
        assert sum("not complete" in m for m in messages) == 2
        assert sum("busy" in m for m in messages) == 4
        await asyncio.sleep(0.05)
        assert server.budget.free == server.budget.total and not server.budget.waiters

    serve(tmp_path, scenario)


def test_budget_is_granted_in_arrival_order() -> None:
    async def scenario() -> None:
        budget = ch.Budget(100)
        order: list[str] = []

        async def take(name: str, size: int) -> None:
            assert await budget.acquire(size, 5)
            order.append(name)

        assert await budget.acquire(90, 1)
        big = asyncio.ensure_future(take("big", 100))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(take("small", 10))  # would fit now, but big came first
        await asyncio.sleep(0.01)
        assert order == []
        budget.release(90)
        await big
        assert order == ["big"]
        budget.release(100)
        await small
        assert order == ["big", "small"]
        budget.release(10)
        assert budget.free == 100 and not budget.waiters

    asyncio.run(scenario())


def test_budget_waiter_that_times_out_unblocks_those_behind_it() -> None:
    async def scenario() -> None:
        budget = ch.Budget(100)
        assert await budget.acquire(50, 1)
        assert not await budget.acquire(100, 0.05)  # gives up; must not block the next
        assert await budget.acquire(50, 0.05)
        assert budget.free == 0 and not budget.waiters

    asyncio.run(scenario())


def test_connections_over_the_cap_are_told_so(tmp_path: Path, short_deadlines: None) -> None:
    async def scenario(server: srv.Server, path: str) -> None:
        server.max_connections = 3
        held = [await asyncio.open_unix_connection(path) for _ in range(4)]
        await asyncio.sleep(0.05)
        reader, _ = await asyncio.open_unix_connection(path)
        reply = await read_reply(reader)
        assert isinstance(reply, p.Error) and reply.code == 3
        assert "3 connections, its limit" in reply.message
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.1)
        assert await status_round_trip(path) < 0.3

    serve(tmp_path, scenario)


def test_per_user_cap_spares_root_and_the_daemon_user(tmp_path: Path) -> None:
    async def scenario(server: srv.Server, path: str) -> None:
        stranger = srv.Peer(pid=1, uid=12345, gid=12345)
        for _ in range(srv.MAX_PER_USER):
            assert server._admit(stranger) is None
        assert "the limit per user" in (server._admit(stranger) or "")
        root = srv.Peer(pid=1, uid=0, gid=0)
        for _ in range(srv.MAX_PER_USER + 1):
            assert server._admit(root) is None

    serve(tmp_path, scenario)


def test_deep_nesting_is_a_bad_request_not_a_crash() -> None:
    body = b"\x82\xa1v\x01\xa3msg" + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(msgspec.DecodeError, match="nested too deeply"):
        p.decode_request(body)


def add_running_run(server: srv.Server, run_id: str = "20260101T000000Z-00000001") -> str:
    """A run the engine holds as RUNNING, with one step that has not started."""
    run = st.RunState(parse_workflow('{"steps": [{"id": "a", "command": "true"}]}', "x"))
    run.run_id = run_id
    server.engine.runs[run_id] = run
    return run_id


@pytest.mark.parametrize("request_kind", ["Watch", "Logs --follow"])
def test_a_stream_ends_when_its_client_is_gone_not_when_it_half_closes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request_kind: str) -> None:
    monkeypatch.setattr(srv, "GONE_POLL", 0.1)

    async def scenario(server: srv.Server, path: str) -> None:
        run_id = add_running_run(server)
        request = (p.Watch(run_id=run_id) if request_kind == "Watch"
                   else p.Logs(run_id=run_id, step="a", follow=True))
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(frame(request))
        writer.write_eof()  # half-closed: it may still read what the stream sends
        await asyncio.sleep(0.5)
        assert len(server.connections) == 1, "a half-closed client lost its stream"
        writer.transport.abort()  # gone for good
        loop = asyncio.get_running_loop()
        started = loop.time()
        while server.connections and loop.time() - started < 3:
            await asyncio.sleep(0.02)
        assert not server.connections, "the stream outlived its client"
        assert not server.engine.watchers

    serve(tmp_path, scenario)


# ---- budgets with a share per user (issue 11.8) -------------------------------------


def test_budget_share_keeps_one_user_from_holding_up_another() -> None:
    async def scenario() -> None:
        budget = ch.Budget(100, share=40)
        assert await budget.acquire(40, 1, key=1)  # user 1 is at its share
        second = asyncio.ensure_future(budget.acquire(30, 5, key=1))
        third = asyncio.ensure_future(budget.acquire(10, 5, key=1))
        await asyncio.sleep(0.01)
        assert not second.done() and not third.done()
        # user 2 is not behind user 1's waiters: they wait for user 1's own bytes
        assert await budget.acquire(40, 0.01, key=2)
        assert await budget.acquire(20, 0.01, key=None)  # no share: only the total
        assert budget.free == 0
        budget.release(40, key=1)
        assert await second and await third  # in user 1's order; 40 is its share again
        assert budget.used[1] == 40
        for size, key in ((30, 1), (10, 1), (40, 2), (20, None)):
            budget.release(size, key)
        assert budget.free == 100 and not budget.used and not budget.waiters

    asyncio.run(scenario())


def test_budget_share_keeps_a_users_own_order() -> None:
    async def scenario() -> None:
        budget = ch.Budget(100, share=50)
        assert await budget.acquire(30, 1, key=1)
        big = asyncio.ensure_future(budget.acquire(40, 5, key=1))  # over the share: waits
        await asyncio.sleep(0)
        # a later, smaller one of the same user would fit, but does not overtake it
        assert not await budget.acquire(10, 0.05, key=1)
        budget.release(30, key=1)
        assert await big
        with pytest.raises(ValueError):
            await budget.acquire(51, 1, key=3)

    asyncio.run(scenario())


# ---- replies: backpressure, not a deadline per frame (issues 10.6, 11.2) -------------


def add_finished_log(server: srv.Server, size: int,
                     run_id: str = "20260101T000000Z-00000002") -> str:
    """A run whose step `a` SUCCEEDED after printing `size` bytes."""
    run_id = add_running_run(server, run_id)
    rec = server.engine.runs[run_id].steps["a"]
    rec.attempts, rec.state = 1, st.SUCCEEDED
    logs = server.engine.layout.state_dir / "runs" / run_id / "logs"
    logs.mkdir(parents=True, mode=0o700)
    (logs / "a.1.log").write_bytes(bytes(range(256)) * (size // 256))
    return run_id


def test_a_slow_reader_that_makes_progress_is_not_cut_off(
        tmp_path: Path, short_deadlines: None) -> None:
    size = 1024 * 1024

    async def scenario(server: srv.Server, path: str) -> None:
        run_id = add_finished_log(server, size)
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, path)
            await loop.sock_sendall(sock, frame(p.Logs(run_id=run_id, step="a")))
            data = bytearray()
            started = loop.time()
            while chunk := await loop.sock_recv(sock, 16 * 1024):
                data += chunk
                await asyncio.sleep(0.05)  # 16 KiB at a time: far slower than the sender
        replies = replies_in(bytes(data))
        assert isinstance(replies[-1], p.LogEnd), replies[-1]
        assert sum(len(r.data) for r in replies if isinstance(r, p.LogData)) == size
        assert loop.time() - started > 4 * ch.WRITE_TIMEOUT  # each frame took longer

    serve(tmp_path, scenario)


def test_a_client_that_reads_nothing_pins_one_frame_then_is_cut_off(
        tmp_path: Path, short_deadlines: None) -> None:
    async def scenario(server: srv.Server, path: str) -> None:
        run_id = add_finished_log(server, 8 * 1024 * 1024)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(frame(p.Logs(run_id=run_id, step="a")))
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not server.connections and loop.time() - started < 1:
            await asyncio.sleep(0.01)
        held = 0
        while server.connections and loop.time() - started < 5:
            held = max(held, server.reply_budget.total - server.reply_budget.free)
            await asyncio.sleep(0.01)
        assert not server.connections, "a client that reads nothing was not cut off"
        assert loop.time() - started < 2
        # at most one frame of replies was ever held for it, budgeted
        assert len(p.encode_frame(p.LogData(1, bytes(srv.LOG_CHUNK)))) <= ch.PART_RESERVE
        assert 0 < held <= ch.PART_RESERVE
        assert server.reply_budget.free == server.reply_budget.total
        writer.transport.abort()

    serve(tmp_path, scenario)


def replies_in(data: bytes) -> list[p.Message]:
    replies = []
    while data:
        length = p.frame_length(data[:4])
        assert len(data) >= 4 + length, "a torn frame"
        replies.append(p.decode_reply(data[4:4 + length]))
        data = data[4 + length:]
    return replies
