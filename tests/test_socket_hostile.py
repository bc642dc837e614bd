"""Hostile and broken clients against a real `wfd`: none of them hurts it.

Hypothesis throws hundreds of frames at a live daemon (random bytes, random
lengths, envelopes of random msgpack, tagged messages with wrong fields, and
valid Structs with wrong values); each gets an error reply or a closed
connection within a deadline, the daemon logs no traceback, and a normal
run succeeds afterwards. Idle, slow, non-reading and memory-hungry clients
are kept busy while `wfctl` runs a workflow to the end; 200 clients are
served at once; memory stays bounded when 200 clients announce 16 MiB each.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import psutil
from helpers import Daemon, write_workflow
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wfd import channel as ch
from wfd import protocol as p

HEADER = struct.Struct(">I")
V = p.PROTOCOL  # the version of the frames this test makes
MB = 1024 * 1024
# Requests a hostile client may send; Shutdown would (rightly) stop the daemon.
TAGS = [cls.__name__ for cls in p.Request.__args__ if cls is not p.Shutdown]  # type: ignore
FIELDS = sorted({f for cls in p.Request.__args__ for f in cls.__struct_fields__})  # type: ignore
RUN_ID = "20260101T000000Z-00000000"  # a well-formed id of no run (the hypothesis test
# swaps it for a real run's id, of the same length, in half of the payloads)
TRUE_WORKFLOW = json.dumps({"steps": [{"id": "a", "command": "true"}]})


def connect(path: Path, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the daemon closes; a reset after its last reply counts as closed
    (it closed with our unread bytes still queued). A timeout fails the test: a hang."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def replies_in(data: bytes) -> list[p.Message]:
    """Split what the daemon sent into replies; each must be a whole, valid frame."""
    replies = []
    while data:
        assert len(data) >= 4, f"a torn header from the daemon: {data!r}"
        length = HEADER.unpack(data[:4])[0]
        assert length <= p.MAX_FRAME
        assert len(data) >= 4 + length, "a torn frame from the daemon"
        replies.append(p.decode_reply(data[4:4 + length]))
        data = data[4 + length:]
    return replies


def exchange(path: Path, payload: bytes) -> list[p.Message]:
    """Send `payload`, end our side, and collect the daemon's replies until it closes."""
    with connect(path) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it closed already, having said what it had to say
        return replies_in(read_all(sock))


def frame_of(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def assert_daemon_healthy(d: Daemon) -> None:
    assert d.running, f"the daemon died:\n{d.log_text()}"
    text = d.log_text(max_lines=100_000)
    for bad in ("Traceback", "error serving", "error answering", "error after commit"):
        assert bad not in text, f"daemon log has {bad!r}:\n{text}"


# ---- strategies ------------------------------------------------------------------

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
texts = st.one_of(st.text(max_size=40), st.sampled_from(
    ["", ".", "..", "../../etc/passwd", "/etc/passwd", RUN_ID, "a", "a/b", "x" * 300,
     "a\x00b", "-rf", "20261125T095852Z-7f3a9c01"]))
msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True), texts,
              st.binary(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(texts, st.sampled_from(FIELDS)), inner,
                                            max_size=4)),
    max_leaves=12,
)


@st.composite
def tagged_maps(draw: st.DrawFn) -> dict[str, Any]:
    """A message-shaped map: a known (or unknown) tag and fields of any type."""
    fields = draw(st.dictionaries(st.sampled_from(FIELDS), msgpack_values, max_size=5))
    fields["type"] = draw(st.one_of(st.sampled_from(TAGS), texts))
    return fields


valid_structs_wrong_values = st.one_of(
    st.builds(p.Hello, client=texts),
    st.builds(p.Status, run_id=st.one_of(st.none(), texts)),
    st.builds(p.Cancel, run_id=texts),
    st.builds(p.Replay, run_id=texts),
    st.builds(p.Resume, run_id=texts),
    st.builds(p.ResumeAll),
    st.builds(p.Watch, run_id=texts, after_seq=ints),
    st.builds(p.Logs, run_id=texts, step=texts, attempt=st.one_of(st.none(), ints),
              follow=st.booleans(), offset=ints),
    st.builds(p.Submit, workflow=st.one_of(texts, st.just(TRUE_WORKFLOW)), source=texts,
              base_dir=st.one_of(texts, st.just("/")),
              env=st.dictionaries(texts, texts, max_size=3),
              umask=st.one_of(st.integers(0, 0o777), ints)),
)


def envelope(v: Any, msg: Any) -> bytes:
    return msgspec.msgpack.encode({"v": v, "msg": msg})


frames = st.one_of(
    # random bytes, as they come
    st.binary(max_size=64),
    # a random length, then random bytes (often fewer or more than announced)
    st.builds(lambda n, body: HEADER.pack(n) + body,
              st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 300)), st.binary(max_size=300)),
    # random msgpack in a well-framed body
    st.builds(lambda v: frame_of(msgspec.msgpack.encode(v)), msgpack_values),
    # an envelope of any version around any value
    st.builds(lambda v, m: frame_of(envelope(v, m)),
              st.one_of(st.just(V), st.just(V), ints, msgpack_values), msgpack_values),
    # a message-shaped map: known or unknown tag, fields of the wrong type
    st.builds(lambda m: frame_of(envelope(V, m)), tagged_maps()),
    # valid Structs with wrong values, one to three in a row
    st.builds(lambda msgs: b"".join(p.encode_frame(m) for m in msgs),
              st.lists(valid_structs_wrong_values, min_size=1, max_size=3)),
    # a valid frame cut off midway
    st.builds(lambda m, cut: p.encode_frame(m)[:cut], valid_structs_wrong_values,
              st.integers(1, 40)),
)


def test_hypothesis_frames_against_a_live_daemon(daemon: Callable[..., Daemon],
                                                 wfd_tmp: Path) -> None:
    d = daemon()
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "echo ok"},
                                            {"id": "b", "command": "true", "depends_on": ["a"]}]})
    real = d.submit(wf, "--wait").encode()
    assert len(real) == len(RUN_ID)
    seen: dict[str, int] = {}

    @settings(max_examples=500, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(payload=frames, real_run=st.booleans())
    def hit(payload: bytes, real_run: bool) -> None:
        if real_run:
            payload = payload.replace(RUN_ID.encode(), real)
        for reply in exchange(d.socket, payload):
            kind = type(reply).__name__
            if isinstance(reply, p.Error):
                assert reply.code in (2, 3), reply
                kind = f"Error({reply.code})"
            seen[kind] = seen.get(kind, 0) + 1

    started = time.monotonic()
    hit()
    elapsed = time.monotonic() - started
    print("replies seen:", seen)
    assert seen.get("Error(2)", 0) > 50, seen  # the bad ones were answered, not just dropped
    assert_daemon_healthy(d)
    done = d.wfctl("run", str(wf), "--wait")
    assert done.returncode == 0, done.stderr
    assert_daemon_healthy(d)
    assert elapsed < 60, f"500 hostile frames took {elapsed:.1f} s"


def test_every_kind_of_bad_frame_gets_its_answer(daemon: Callable[..., Daemon]) -> None:
    """The cases of issue 5 one by one, with what each gets."""
    d = daemon()
    path = d.socket

    def error(payload: bytes) -> p.Error:
        replies = exchange(path, payload)
        assert len(replies) == 1 and isinstance(replies[0], p.Error), replies
        return replies[0]

    # oversize and absurd lengths: answered before any body is read
    assert "over the 16777216 byte limit" in error(HEADER.pack(p.MAX_FRAME + 1)).message
    assert "4294967295 bytes" in error(b"\xff\xff\xff\xff" + b"x" * 100).message
    # garbage msgpack, wrong type, unknown tag, unknown field, wrong value
    assert error(frame_of(b"\xc1garbage")).message.startswith("bad request: ")
    assert "Expected `object`, got `array`" in error(frame_of(msgspec.msgpack.encode([1]))).message
    assert "Invalid value 'Explode'" in error(frame_of(envelope(V, {"type": "Explode"}))).message
    assert "unknown field `x`" in error(frame_of(envelope(V, {"type": "Status", "x": 1}))).message
    assert "Expected `str | null`, got `int`" in error(
        frame_of(envelope(V, {"type": "Status", "run_id": 7}))).message
    assert ">= 0 - at `$.offset`" in error(
        frame_of(envelope(V, {"type": "Logs", "run_id": RUN_ID, "step": "a", "offset": -1}))
    ).message
    assert "nested too deeply" in error(frame_of(b"\x82\xa1v\x01\xa3msg" + b"\x91" * 100_000
                                                 + b"\xc0")).message
    # paths never reach the file system: ids are checked first
    assert error(p.encode_frame(p.Status(run_id="../../etc"))).message == \
        "malformed run id '../../etc'"
    assert error(p.encode_frame(p.Logs(run_id=RUN_ID, step="../x"))).message == \
        f"no such run: {RUN_ID}"
    assert "base_dir must be an absolute path" in error(p.encode_frame(p.Submit(
        workflow=TRUE_WORKFLOW, source="x", base_dir="rel", env={}, umask=0o22))).message
    assert "invalid variable name" in error(p.encode_frame(p.Submit(
        workflow=TRUE_WORKFLOW, source="x", base_dir="/", env={"A=B": "x"}, umask=0))).message
    # another protocol version, both ways round: the daemon says which it speaks
    other = error(frame_of(envelope(p.PROTOCOL + 1, {"type": "Hello", "client": "wfctl"})))
    assert other.code == 3
    assert other.message == f"wfd speaks protocol {p.PROTOCOL}, this wfctl speaks {p.PROTOCOL + 1}"
    # a frame cut off midway, and a connect that sends nothing: closed, no reply
    assert exchange(path, p.encode_frame(p.Status())[:7]) == []
    assert exchange(path, b"") == []
    # a request error leaves the connection usable: the next request is answered
    replies = exchange(path, p.encode_frame(p.Status(run_id=RUN_ID)) + p.encode_frame(p.Status()))
    assert [type(r).__name__ for r in replies] == ["Error", "RunList"]
    assert_daemon_healthy(d)


class Hostile:
    """Background clients that misbehave; `results` collects what each got."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socks: list[socket.socket] = []
        self.threads: dict[str, list[threading.Thread]] = {}
        self.results: dict[str, list[Any]] = {}
        self.stop = threading.Event()

    def _record(self, kind: str, value: Any) -> None:
        self.results.setdefault(kind, []).append(value)

    def hold(self, count: int, payload: bytes) -> None:
        """Connect, send `payload` (maybe nothing, maybe half a header), then wait."""
        for _ in range(count):
            sock = connect(self.path)
            sock.sendall(payload)
            self.socks.append(sock)

    def start(self, kind: str, target: Callable[[socket.socket], Any], count: int = 1) -> None:
        self.threads.setdefault(kind, [])
        for _ in range(count):
            sock = connect(self.path, timeout=60)
            self.socks.append(sock)

            def run(sock: socket.socket = sock) -> None:
                started = time.monotonic()
                try:
                    outcome = target(sock)
                except OSError as e:
                    outcome = e
                self._record(kind, (outcome, time.monotonic() - started))

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            self.threads[kind].append(thread)

    def byte_a_second(self, sock: socket.socket) -> Any:
        data = p.encode_frame(p.Status())
        for byte in data:
            if self.stop.is_set():
                return "stopped"
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            self.stop.wait(1.0)
        return replies_in(read_all(sock))

    def announce_16_mib(self, sock: socket.socket) -> Any:
        sock.sendall(HEADER.pack(16 * MB))
        return replies_in(read_all(sock))

    def never_read(self, sock: socket.socket) -> Any:
        try:
            sock.sendall(p.encode_frame(p.Status()) * 20_000)
        except OSError as e:
            return e
        self.stop.wait(60)
        return "stopped"

    def join(self, kinds: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for kind in kinds:
            for thread in self.threads[kind]:
                thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
            except OSError:
                pass
            sock.close()


def test_slow_idle_and_greedy_clients_do_not_hold_up_a_run(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    baseline = psutil.Process(d.proc.pid).memory_info().rss
    hostile = Hostile(d.socket)
    try:
        hostile.hold(50, b"")  # connect and never send
        hostile.hold(10, b"\x00\x00")  # half a header
        hostile.start("byte-a-second", hostile.byte_a_second, count=3)
        hostile.start("16 MiB announced", hostile.announce_16_mib, count=8)
        hostile.start("never reads", hostile.never_read, count=2)
        time.sleep(0.5)
        started = time.monotonic()
        done = d.wfctl("status")
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 3
        wf = write_workflow(wfd_tmp, {"steps": [
            {"id": "a", "command": "sleep 0.5"},
            {"id": "b", "command": "sleep 0.5", "depends_on": ["a"]},
            {"id": "c", "command": "echo done", "depends_on": ["a"]},
        ]})
        started = time.monotonic()
        done = d.wfctl("run", str(wf), "--wait")
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 8
        # Their deadlines: a frame must be whole 10 s after its first byte; a large one
        # waits 10 s at most for budget. Each is told why, then closed.
        hostile.join(["byte-a-second", "16 MiB announced"], timeout=ch.FRAME_TIMEOUT + 10)
        slow = hostile.results["byte-a-second"]
        assert len(slow) == 3
        for replies, took in slow:
            assert [r.message for r in replies] == [
                f"frame not complete within {ch.FRAME_TIMEOUT:g} s of its first byte; closing"]
            assert took < ch.FRAME_TIMEOUT + 3
        greedy = [r for replies, _ in hostile.results["16 MiB announced"] for r in replies]
        assert len(greedy) == 8
        # as many as fit in the budget got it and were cut off at the frame deadline; the
        # others were told, sooner, that the daemon is busy
        fit = ch.BUDGET // (16 * MB)
        assert sum("not complete" in r.message for r in greedy) == fit
        assert sum(r.message == "wfd is busy reading other large requests; try again"
                   for r in greedy) == 8 - fit
        rss = psutil.Process(d.proc.pid).memory_info().rss
        assert rss - baseline < 150 * MB, f"daemon grew by {(rss - baseline) // MB} MiB"
    finally:
        hostile.close()
    assert_daemon_healthy(d)


def test_200_clients_at_once(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    run_id = d.submit(write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]}),
                      "--wait")
    # 200 raw connections, all open before the first request is sent
    socks = [connect(d.socket, timeout=20) for _ in range(200)]
    try:
        for sock in socks:
            sock.sendall(p.encode_frame(p.Hello()) + p.encode_frame(p.Status()))
        for sock in socks:
            hello, runs = p.recv_reply(sock), p.recv_reply(sock)
            assert isinstance(hello, p.HelloReply)
            assert isinstance(runs, p.RunList) and [r.run_id for r in runs.runs] == [run_id]
    finally:
        for sock in socks:
            sock.close()
    # 200 `wfctl status` processes at once
    procs = [d.popen("status", "--json") for _ in range(200)]
    outcomes = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        outcomes.append((proc.returncode, out, err))
    failed = [o for o in outcomes if o[0] != 0]
    assert not failed, f"{len(failed)} of 200 failed, e.g. {failed[0]}"
    assert all(json.loads(out)[0]["run_id"] == run_id for _, out, _ in outcomes)
    assert_daemon_healthy(d)


def test_200_clients_announcing_16_mib_cannot_exhaust_memory(
        daemon: Callable[..., Daemon]) -> None:
    """Each sends a header of 16 MiB and as much of the body as the daemon takes, then
    stalls: at most BUDGET bytes of bodies exist at once, and small requests are
    answered promptly meanwhile."""
    d = daemon()
    proc = psutil.Process(d.proc.pid)
    baseline = proc.memory_info().rss
    body = memoryview(bytes(16 * MB - 1))  # one byte short: never a whole frame
    stop = threading.Event()
    peak = [baseline]
    results: list[Any] = []

    def greedy() -> None:
        try:
            with connect(d.socket, timeout=30) as sock:
                sock.sendall(HEADER.pack(16 * MB))
                try:
                    sock.sendall(body)
                except OSError:
                    pass  # cut off; its reply is waiting
                results.append(replies_in(read_all(sock)))
        except OSError as e:
            results.append(e)

    def watch_memory() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], proc.memory_info().rss)
            except psutil.Error:
                return
            stop.wait(0.05)

    threads = [threading.Thread(target=greedy, daemon=True) for _ in range(200)]
    monitor = threading.Thread(target=watch_memory, daemon=True)
    monitor.start()
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        for _ in range(3):
            started = time.monotonic()
            assert hello_and_status(d.socket)
            assert time.monotonic() - started < 2, "a small request waited behind large ones"
        for thread in threads:
            thread.join(ch.FRAME_TIMEOUT + ch.BUDGET_WAIT + 20)
    finally:
        stop.set()
        monitor.join()
    assert len(results) == 200
    messages = [r[0].message for r in results if isinstance(r, list) and r]
    assert len(messages) == 200, [r for r in results if not (isinstance(r, list) and r)][:3]
    assert all("not complete" in m or "busy" in m for m in messages)
    grown = peak[0] - baseline
    print(f"daemon memory grew by {grown // MB} MiB at most")
    assert grown < ch.BUDGET + 40 * MB, f"daemon grew by {grown // MB} MiB"
    assert_daemon_healthy(d)


def hello_and_status(path: Path) -> bool:
    with connect(path) as sock:
        sock.sendall(p.encode_frame(p.Hello()) + p.encode_frame(p.Status()))
        return (isinstance(p.recv_reply(sock), p.HelloReply)
                and isinstance(p.recv_reply(sock), p.RunList))
