"""The socket protocol between wfctl (or any client) and wfd; see docs/protocol.md.

A frame is a 4-byte big-endian length and a msgpack body of at most 16 MiB.
Every body is an `Envelope`: the protocol version and the message itself, kept
raw until the version is known, so that a client and a daemon of different
versions say so ("wfd speaks protocol 2, this wfctl speaks 1") instead of
failing on an unknown tag. Messages are msgspec Structs in two tagged unions,
`Request` and `Reply`, tagged by `type`.

A request gets one reply, except `Watch` and `Logs`, which get a stream of
replies ending with `RunEnded` / `LogEnd` (or `Error`).

No reply is too big to send (protocol 2). A long list or map goes in parts:
`RunsPart`, `StepsPart` and `ReplayPart` frames, each a slice of about
`PART_SIZE` bytes, come before the reply they belong to, and the receiver
prepends their items to the reply's own (`Assembler`). So the daemon makes a
reply a slice at a time, from live state or a log file, and never holds all
of it. A single message that is still too big for one frame (a 16 MiB name)
comes as `Fragment`s of its encoding. `recv_reply` does both and returns whole
replies; `recv_message` returns what one frame (or its fragments) carried.

Versions: the envelope `{v, msg}` never changes. Any change to a message (a
new field, a new type, a new constraint) bumps `PROTOCOL`: messages forbid
unknown fields, so peers of different versions must not try to understand
each other's messages, only to say that they differ. A peer that receives
another version answers one `Error` in its own version and closes.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator
from typing import Annotated, TypeVar, Union

import msgspec

from wfd.events import AnyEvent
from wfd.state import RunStatus, RunSummary, StepStatus

PROTOCOL = 3
MAX_FRAME = 16 * 1024 * 1024
HEADER = struct.Struct(">I")
TAIL_WINDOW = 64 * 1024  # how far back `Logs.tail` looks for the start of its lines
PART_SIZE = 256 * 1024  # bytes of items the daemon puts in one part (at least one item)
FRAGMENT_SIZE = 1024 * 1024  # a message encoding to more goes as Fragments of this size

T = TypeVar("T")

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
    relative `cwd`s resolve against; `env` and `umask` the submitting client's;
    `vars` the KEY=VALUE arguments, over every level of the workflow's env (protocol 3);
    `key` makes the submit idempotent: the peer's run with that key, if there is one, is
    the answer, and no run is made."""

    workflow: str
    source: str
    base_dir: str
    env: dict[str, str]
    umask: Umask
    vars: dict[str, str] = {}
    key: str | None = None


class Status(Message):
    """One run's status, or with no `run_id` the list of runs the peer may see: those
    in one of `states` (any if empty), of workflow `name`, created at or after `since`
    (epoch seconds), and of those the newest `limit` (all if None)."""

    run_id: str | None = None
    states: list[str] = msgspec.field(default_factory=list)
    name: str | None = None
    since: float | None = None
    limit: Positive | None = None


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
    next attempts until the step is terminal. `tail` N > 0: start at the last N
    lines of that first attempt's log instead of at `offset` (looked for in its
    last `TAIL_WINDOW` bytes), as `tail -n N` does."""

    run_id: str
    step: str
    attempt: Positive | None = None
    follow: bool = False
    offset: NonNegative = 0
    tail: NonNegative = 0


class Rerun(Message):
    """A new run of `run_id`'s stored workflow, with its submission's context (directory,
    environment, umask) and variables, `vars` over them; answered by `Submitted`."""

    run_id: str
    vars: dict[str, str] = {}


class Retry(Message):
    """Run `steps` of the finished run `run_id` again, in that run (with `downstream`,
    every step after them too); the others keep their results. Answered by `Retried`
    once the run is durably RUNNING again."""

    run_id: str
    steps: list[str]
    downstream: bool = False


class Prune(Message):
    """Remove finished runs the peer may remove (its own; root's: anyone's): those in one
    of `states` (default SUCCEEDED, FAILED, CANCELLED) of workflow `name`, except the
    newest `keep`, that finished more than `older_than` seconds ago; with `dry_run`
    only say which. Answered by `Pruned`."""

    keep: NonNegative | None = None
    older_than: Annotated[float, msgspec.Meta(ge=0)] | None = None
    states: list[str] = msgspec.field(default_factory=list)
    name: str | None = None
    dry_run: bool = False


class Shutdown(Message):
    """Stop the daemon as SIGTERM would (running attempts go on under the keeper; with
    `stop_steps`, they are stopped first); answered with `Ok` before it stops."""

    stop_steps: bool = False


class PoolList(Message):
    """The daemon's pools: answered by `Pools`."""


class PoolSet(Message):
    """Set pool `name`'s limit (creating the pool), durably; answered by `Pools`. Only
    root and the daemon's own user may (a pool is shared by every user)."""

    name: str
    limit: NonNegative


class ScheduleAdd(Message):
    """A new schedule of the peer's: slots by `cron` (in `tz`, an IANA zone) or `every`
    seconds from now; its runs are this workflow in this context, as `Submit`'s."""

    name: str
    workflow: str
    source: str
    base_dir: str
    env: dict[str, str]
    umask: Umask
    vars: dict[str, str] = {}
    cron: str | None = None
    every: float | None = None
    tz: str = "UTC"
    catch_up: str = "latest"
    max_catch_up: NonNegative = 10
    overlap: str = "skip"


class ScheduleUpdate(Message):
    """Later runs of the schedule use this workflow (and its file's name and directory)."""

    name: str
    workflow: str
    source: str
    base_dir: str


class ScheduleCommand(Message):
    """`action` one of `pause`, `unpause`, `remove` (answered `Ok`) or `fire` (a run now,
    answered `Submitted`)."""

    name: str
    action: str


class ScheduleList(Message):
    """The peer's schedules (all of them for root), or the one named."""

    name: str | None = None


Request = Union[  # noqa: UP007
    Hello, Submit, Status, Cancel, Replay, Resume, ResumeAll, Watch, Logs, Rerun, Retry,
    Prune, Shutdown, PoolList, PoolSet,
    ScheduleAdd, ScheduleUpdate, ScheduleCommand, ScheduleList,
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
    """The run exists and its first event is durable; `existing` when the submit's `key`
    named a run made before (nothing new was submitted)."""

    run_id: str
    existing: bool = False


class RunInfo(Message):
    """Status of one run (the `status --json` object)."""

    status: RunStatus


class RunList(Message):
    """Runs the peer may see, oldest first (after those of the `RunsPart`s before it).

    `storage_error`: why the daemon cannot persist events now, if it cannot: the
    unfinished runs are held until it can (SPEC 4). `matched`: how many runs passed
    the request's filters (before its `limit`); `counts`: those by state."""

    runs: list[RunSummary]
    storage_error: str | None = None
    matched: int = 0
    counts: dict[str, int] = msgspec.field(default_factory=dict)


class Cancelled(Message):
    """The run `run_id` is over; `was_finished` when it had ended before the cancel."""

    state: str
    was_finished: bool
    run_id: str = ""


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
    """The runs are durably RUNNING again; `after_seq`: per run, the last seq before the
    resume (a `Watch` from there shows what the resume did)."""

    run_ids: list[str]
    after_seq: dict[str, int] = {}


class Retried(Message):
    """The run is durably RUNNING again with `steps` (those named and, with `downstream`,
    those after them) to run; `after_seq` as in `Resumed`."""

    run_id: str
    steps: list[str]
    after_seq: int = 0


class Pruned(Message):
    """The runs removed (with `dry_run`: that would be), oldest first."""

    run_ids: list[str]
    dry_run: bool = False


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


class ScheduleView(msgspec.Struct):
    """One schedule as `schedule list --json` shows it. Times are UTC RFC 3339."""

    name: str
    owner: str
    cron: str | None
    every: float | None
    tz: str
    catch_up: str
    max_catch_up: int
    overlap: str
    paused: bool
    added_at: str
    workflow: str  # the workflow's name
    next_at: str | None  # the next slot (null while paused)
    last_slot: str | None  # the newest slot decided
    queued: str | None  # a slot waiting for the previous run (overlap queue)
    last_run: str | None
    last_run_state: str | None
    vars: dict[str, str]
    env: list[str]  # the names of the stored variables (not their values)


class Schedules(Message):
    """Schedules, by name."""

    schedules: list[ScheduleView]


# ---- parts of long replies (see the module docstring) ------------------------


class RunsPart(Message):
    """Runs that go before those of the `RunList` that follows."""

    runs: list[RunSummary]


class StepsPart(Message):
    """Steps that go before those of the next `status` (of a `RunInfo`, `RunEnded` or
    `Replayed`), in file order."""

    steps: dict[str, StepStatus]


class ReplayPart(Message):
    """Log lines and transitions that go before those of the `Replayed` that follows."""

    lines: list[str] = msgspec.field(default_factory=list)
    transitions: list[str] = msgspec.field(default_factory=list)


class Fragment(Message):
    """A piece of one message too big for a frame: the `data` of consecutive Fragments,
    up to the one that is `last`, is that message's msgpack (what `msg` holds)."""

    data: bytes
    last: bool = False


class PoolInfo(msgspec.Struct):
    """One pool in `wfctl pool list --json`: its limit, its running steps, the READY
    steps that name it, and where the limit comes from: "option" (`wfd --pool`) or
    "set" (`wfctl pool set`, kept across restarts)."""

    name: str
    limit: int
    running: int
    waiting: int
    source: str


class Pools(Message):
    """The daemon's pools, by name."""

    pools: list[PoolInfo]


Reply = Union[  # noqa: UP007
    Error, Ok, HelloReply, Submitted, RunInfo, RunList, Cancelled, Replayed, Resumed,
    Retried, Pruned, Progress, RunEnded, LogData, LogEnd, RunsPart, StepsPart, ReplayPart,
    Fragment, Pools, Schedules,
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
    return _frame(_encoder.encode(msg))


def _frame(encoded_msg: bytes) -> bytes:
    body = _encoder.encode(Envelope(PROTOCOL, msgspec.Raw(encoded_msg)))
    return HEADER.pack(len(body)) + body


def encode_frames(msg: Message) -> Iterator[bytes]:
    """The frames that carry `msg`: one, or Fragments of FRAGMENT_SIZE when it is bigger
    (so that no message is too big to send)."""
    encoded = _encoder.encode(msg)
    if len(encoded) <= FRAGMENT_SIZE:
        yield _frame(encoded)
        return
    view = memoryview(encoded)
    for start in range(0, len(encoded), FRAGMENT_SIZE):
        piece = view[start:start + FRAGMENT_SIZE]
        yield encode_frame(Fragment(bytes(piece), start + FRAGMENT_SIZE >= len(encoded)))


def packed(items: Iterable[T], size: int = PART_SIZE) -> Iterator[tuple[list[T], bool]]:
    """`items` in groups of about `size` encoded bytes (at least one item each), and
    whether each is the last group (which goes in the reply itself, not in a part)."""
    group: list[T] = []
    total = 0
    for item in items:
        weight = len(_encoder.encode(item))
        if group and total + weight > size:
            yield group, False
            group, total = [], 0
        group.append(item)
        total += weight
    yield group, True


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


class Assembler:
    """Puts long replies together: parts are kept until the reply they belong to comes,
    which gets their items in front of its own. `add` returns each whole reply, and None
    for a part. A part that no reply takes is a broken stream (ValidationError)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.runs: list[RunSummary] = []
        self.steps: dict[str, StepStatus] = {}
        self.lines: list[str] = []
        self.transitions: list[str] = []

    def add(self, msg: Reply) -> Reply | None:
        if isinstance(msg, RunsPart):
            self.runs += msg.runs
        elif isinstance(msg, StepsPart):
            self.steps.update(msg.steps)
        elif isinstance(msg, ReplayPart):
            self.lines += msg.lines
            self.transitions += msg.transitions
        else:
            return self._complete(msg)
        return None

    def _complete(self, msg: Reply) -> Reply:
        if isinstance(msg, RunList):
            msg.runs = self.runs + msg.runs
            self.runs = []
        if isinstance(msg, Replayed):
            msg.lines = self.lines + msg.lines
            msg.transitions = self.transitions + msg.transitions
            self.lines, self.transitions = [], []
        status = getattr(msg, "status", None)
        if isinstance(status, RunStatus) and self.steps:
            self.steps.update(status.steps)
            status.steps, self.steps = self.steps, {}
        leftover = self.runs or self.steps or self.lines or self.transitions
        if leftover and not isinstance(msg, Error):  # an Error ends whatever was under way
            raise msgspec.ValidationError(f"parts of a reply came before {type(msg).__name__}")
        self._reset()
        return msg


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


def _recv_frame(sock: socket.socket) -> Reply:
    length = frame_length(_recv_exactly(sock, HEADER.size))
    if length > MAX_FRAME:
        raise ConnectionError(f"the daemon sent an oversize frame ({length} bytes)")
    return decode_reply(_recv_exactly(sock, length))


def recv_message(sock: socket.socket) -> Reply:
    """The next message, put together from its Fragments if it came in pieces (a reply
    or a part); ConnectionError when the daemon goes away."""
    msg = _recv_frame(sock)
    if not isinstance(msg, Fragment):
        return msg
    data = bytearray()
    while True:
        data += msg.data
        if msg.last:
            break
        msg = _recv_frame(sock)
        if not isinstance(msg, Fragment):
            raise msgspec.ValidationError(f"{type(msg).__name__} in the middle of a message")
    whole = _reply_decoder.decode(data)
    if isinstance(whole, Fragment):
        raise msgspec.ValidationError("a Fragment inside a Fragment")
    return whole


def recv_reply(sock: socket.socket) -> Reply:
    """The next whole reply, its parts and fragments put together; ConnectionError when
    the daemon goes away."""
    assembler = Assembler()
    while True:
        whole = assembler.add(recv_message(sock))
        if whole is not None:
            return whole
