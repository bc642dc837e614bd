"""The socket server in-process, with its deadlines shortened: idle, slow and
non-reading clients are cut off on time, large frames share the budget in
arrival order, small requests never wait behind them, connections are capped.

The same behaviour at the real deadlines, through the real binaries, is in
test_socket_hostile.py; these tests check the deadlines themselves, which take
seconds to minutes at their real values.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pytest

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
    monkeypatch.setattr(srv, "IDLE_TIMEOUT", 0.4)
    monkeypatch.setattr(srv, "FRAME_TIMEOUT", 0.4)
    monkeypatch.setattr(srv, "WRITE_TIMEOUT", 0.4)
    monkeypatch.setattr(srv, "BUDGET_WAIT", 0.4)


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
    monkeypatch.setattr(srv, "BUDGET", 4 * srv.SMALL_FRAME)
    size = 2 * srv.SMALL_FRAME

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
        budget = srv.Budget(100)
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
        budget = srv.Budget(100)
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
