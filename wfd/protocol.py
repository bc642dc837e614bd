"""The socket protocol between wfctl (or any client) and wfd; see docs/protocol.md.

A frame is a 4-byte big-endian length and a msgpack body of at most 16 MiB.
Every body is an `Envelope`: the protocol version and the message itself, kept
raw until the version is known, so that a client and a daemon of different
versions say so ("wfd speaks protocol 2, this wfctl speaks 1") instead of
failing on an unknown tag. Messages are msgspec Structs in two tagged unions,
`Request` and `Reply`, tagged by `type`.

A request gets one reply, except `Watch` and `Logs`, which get a stream of
replies ending with `RunEnded` / `LogEnd` (or `Error`).

Versions: the envelope `{v, msg}` never changes. Any change to a message (a
new field, a new type, a new constraint) bumps `PROTOCOL`: messages forbid
unknown fields, so peers of different versions must not try to understand
each other's messages, only to say that they differ. A peer that receives
another version answers one `Error` in its own version and closes.
"""

from __future__ import annotations

import socket
import struct
from typing import Annotated, Union

import msgspec

from wfd.events import AnyEvent
from wfd.state import RunStatus, RunSummary

PROTOCOL = 1
MAX_FRAME = 16 * 1024 * 1024
HEADER = struct.Struct(">I")

# Constraints checked when a message is decoded: a value outside them is a bad request.
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Umask = Annotated[int, msgspec.Meta(ge=0, le=0o777)]


class Envelope(msgspec.Struct):
    """Outer frame body: `v` is the sender's protocol version; `msg` one message."""

    v: int
    msg: msgspec.Raw


class Message(msgspec.Struct, tag_field="type", tag=True, forbid_unknown_fields=True):
    """Base of every message: typed, tagged, strict, so a typo is an error, not a default."""


# ---- requests -------------------------------------------------------------


class Hello(Message):
    """Who are you: answered by `HelloReply`; used to probe whether a daemon answers."""

    client: str = ""


class Submit(Message):
    """Start a run of `workflow` (the file's text) as the peer's uid.

    `source` is the file's name (the run's default name); `base_dir` the directory
    relative `cwd`s resolve against; `env` and `umask` the submitting client's."""

    workflow: str
    source: str
    base_dir: str
    env: dict[str, str]
    umask: Umask


class Status(Message):
    """One run's status, or with no `run_id` the list of runs the peer may see."""

    run_id: str | None = None


class Cancel(Message):
    """Cancel a run; answered once every step process is gone."""

    run_id: str


class Replay(Message):
    """Re-fold the run's persisted log and report each transition and the final state."""

    run_id: str


class Resume(Message):
    """Continue a FAILED or CANCELLED run, or pick up an unfinished one not running."""

    run_id: str


class ResumeAll(Message):
    """Resume every unfinished run the daemon is not running."""


class Watch(Message):
    """Stream the run's events after `after_seq` as `Progress`, then `RunEnded`."""

    run_id: str
    after_seq: NonNegative = 0


class Logs(Message):
    """Stream an attempt's output from `offset` as `LogData`, then `LogEnd`.

    `attempt` None means the latest; with `follow` the stream waits for more
    output until the attempt ends, and without `attempt` goes on to the step's
    next attempts until the step is terminal."""

    run_id: str
    step: str
    attempt: Positive | None = None
    follow: bool = False
    offset: NonNegative = 0


class Shutdown(Message):
    """Stop the daemon as SIGTERM would; answered with `Ok` before it stops."""


Request = Union[  # noqa: UP007
    Hello, Submit, Status, Cancel, Replay, Resume, ResumeAll, Watch, Logs, Shutdown
]

# ---- replies --------------------------------------------------------------


class Error(Message):
    """The request failed: `code` is the exit code wfctl uses (SPEC 5)."""

    code: int
    message: str


class Ok(Message):
    """Done, nothing to report."""


class HelloReply(Message):
    """The daemon's version, protocol, pid, and whether it is a system daemon."""

    version: str
    protocol: int
    pid: int
    system: bool
    uid: int


class Submitted(Message):
    """The run exists and its first event is durable."""

    run_id: str


class RunInfo(Message):
    """Status of one run (the `status --json` object)."""

    status: RunStatus


class RunList(Message):
    """Runs the peer may see, oldest first."""

    runs: list[RunSummary]


class Cancelled(Message):
    """The run is over; `was_finished` when it had ended before the cancel."""

    state: str
    was_finished: bool


class Replayed(Message):
    """The run's log re-folded: its event lines, the final state, problems found.

    `lines` are the committed JSON lines as stored; `problems` name seq gaps,
    illegal transitions and damaged lines (exit 5); `torn_tail` notes a torn
    last line that recovery drops (exit 0)."""

    lines: list[str]
    transitions: list[str]
    status: RunStatus | None
    problems: list[str]
    torn_tail: str | None = None


class Resumed(Message):
    """The runs are durably RUNNING again."""

    run_ids: list[str]


class Progress(Message):
    """Events of a watched run, in seq order."""

    events: list[AnyEvent]


class RunEnded(Message):
    """The watched run is over (or CORRUPT)."""

    status: RunStatus


class LogData(Message):
    """A piece of an attempt's output."""

    attempt: int
    data: bytes


class LogEnd(Message):
    """No more output will come for this request; `step_state` is the step's state now."""

    attempt: int | None
    step_state: str


Reply = Union[  # noqa: UP007
    Error, Ok, HelloReply, Submitted, RunInfo, RunList, Cancelled, Replayed, Resumed,
    Progress, RunEnded, LogData, LogEnd,
]

_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


class VersionMismatch(Exception):
    """The peer speaks another protocol version; `theirs` is it."""

    def __init__(self, theirs: int) -> None:
        super().__init__(theirs)
        self.theirs = theirs


def encode_frame(msg: Message) -> bytes:
    """Length prefix plus envelope, ready to send."""
    body = _encoder.encode(Envelope(PROTOCOL, msgspec.Raw(_encoder.encode(msg))))
    return HEADER.pack(len(body)) + body


def _open(body: bytes) -> msgspec.Raw:
    envelope = _envelope_decoder.decode(body)
    if envelope.v != PROTOCOL:
        raise VersionMismatch(envelope.v)
    return envelope.msg


def _decode(decoder: msgspec.msgpack.Decoder, body: bytes) -> Message:
    try:
        return decoder.decode(_open(body))
    except RecursionError:  # msgspec's guard against absurdly deep nesting
        raise msgspec.DecodeError("MessagePack data is nested too deeply") from None


def decode_request(body: bytes) -> Request:
    """Body to request; raises msgspec.DecodeError / ValidationError or VersionMismatch."""
    return _decode(_request_decoder, body)  # type: ignore[return-value]


def decode_reply(body: bytes) -> Reply:
    """Body to reply; raises msgspec.DecodeError / ValidationError or VersionMismatch."""
    return _decode(_reply_decoder, body)  # type: ignore[return-value]


def peer_name(body: bytes) -> str:
    """What a peer of another version calls itself (Hello's `client`), for messages;
    "client" when that cannot be read. Never raises."""
    try:
        msg = msgspec.msgpack.decode(_envelope_decoder.decode(body).msg)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return "client"
    name = msg.get("client") if isinstance(msg, dict) else None
    if isinstance(name, str) and name.isidentifier() and len(name) <= 32:
        return name
    return "client"


def frame_length(header: bytes) -> int:
    """The body length a 4-byte header announces (the caller checks it against MAX_FRAME)."""
    (length,) = HEADER.unpack(header)
    return length


# ---- blocking client side ---------------------------------------------------


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(min(n - len(chunks), 1 << 20))
        if not chunk:
            raise ConnectionError("the daemon closed the connection")
        chunks += chunk
    return bytes(chunks)


def send(sock: socket.socket, msg: Message) -> None:
    sock.sendall(encode_frame(msg))


def recv_reply(sock: socket.socket) -> Reply:
    """Read one reply frame; ConnectionError when the daemon goes away."""
    length = frame_length(_recv_exactly(sock, HEADER.size))
    if length > MAX_FRAME:
        raise ConnectionError(f"the daemon sent an oversize frame ({length} bytes)")
    return decode_reply(_recv_exactly(sock, length))
