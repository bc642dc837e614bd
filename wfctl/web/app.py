"""`wfctl web`: the runs of wfd as a live local web page (aiohttp, extra `wfd[web]`).

The page is served by a process of the user's, which talks to the daemon
through its socket as that user, with the same requests as `wfctl` (one
connection per request, through `wfctl.conn`); so it shows exactly what
`wfctl` would show this user, and the daemon itself opens no TCP port.

Who may look (a browser will visit other sites meanwhile):
- It listens on 127.0.0.1 only, on `--port` (default: a free one).
- A random token is in the address it prints, as Jupyter does; it is
  compared in constant time. On first use it moves into an HttpOnly,
  SameSite=Strict cookie named for the port, and the browser is sent to the
  same address without it, so it is not left in the history. No token, no
  page (403).
- The Host header must be `127.0.0.1:PORT` or `localhost:PORT`: a page of
  another site whose name was re-pointed at 127.0.0.1 (DNS rebinding) is
  refused, token or not.
- No CORS header is ever sent. A request that changes something (POST) must
  carry the header `X-Wfd: 1`, which another origin cannot send without a
  preflight this server never grants, and a same-origin `Origin` if any.
- Every asset ships in the package; the CSP allows nothing from elsewhere.

Live updates are server-sent events: a run's page gets one stream fed by the
daemon's `Watch` (every event from the first, then each as it is durable),
sent as the run's status (a `Status` after each batch), its Gantt as SVG, and
the transitions as text; a step's log is a stream fed by `Logs`.
"""

from __future__ import annotations

import asyncio
import codecs
import secrets
import signal
import socket
import sys
import threading
import time
import webbrowser
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import msgspec
from aiohttp import web

from wfctl import graph, timeline
from wfctl.conn import Connection, ReplyError, connect
from wfd import protocol
from wfd.errors import EXIT_USAGE, UsageError, WfdError
from wfd.state import describe

STATIC = Path(__file__).with_name("static")
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "icon.svg": "image/svg+xml"}
PAGES = {"runs": "index.html", "run": "run.html"}
TICK = 1.0  # a running run's Gantt is redrawn this often when nothing happens
COALESCE = 0.15  # events arriving within this go out as one update
MAX_LOG_EVENTS = 200  # transitions shown under a run, the latest

# What the run page's buttons do: the same requests as `wfctl cancel` / `wfctl resume`. The
# page shows a button for each entry. Hook: once the daemon has a `Retry` request (issue
# 14), add "retry" here and the page gets its button.
ACTIONS: dict[str, tuple[Callable[[str], protocol.Message], type]] = {
    "cancel": (lambda run_id: protocol.Cancel(run_id=run_id), protocol.Cancelled),
    "resume": (lambda run_id: protocol.Resume(run_id=run_id), protocol.Resumed),
}

DAEMON = web.AppKey("daemon", object)
TOKEN = web.AppKey("token", str)
COOKIE = web.AppKey("cookie", str)
HOSTS = web.AppKey("hosts", frozenset)

_json = msgspec.json.Encoder()


# ---- the daemon, through wfctl's client ------------------------------------------------


class Daemon:
    """The daemon `wfctl web` found at start; every request opens its own connection to
    the same socket, with the same checks (blocking client code, run in threads)."""

    def __init__(self, first: Connection) -> None:
        self.path = first.path
        self.trust = first.trust  # what conn.py checked of the socket, checked again each time
        first.close()

    def open(self) -> Connection:
        return connect(self.path, trust=self.trust)

    def call_sync(self, msg: protocol.Message, kind: type) -> Any:
        conn = self.open()
        try:
            return conn.call(msg, kind)
        finally:
            conn.close()

    async def call(self, msg: protocol.Message, kind: type) -> Any:
        return await asyncio.to_thread(self.call_sync, msg, kind)


class Stream:
    """A streaming request (`Watch`, `Logs`) read by a thread of its own: its replies
    arrive on `queue`, then None at its end, or the exception that ended it. `close`
    ends it at once (shutdown wakes the thread's blocked recv)."""

    END = (protocol.RunEnded, protocol.LogEnd)

    def __init__(self, daemon: Daemon, msg: protocol.Message) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._run, args=(daemon, msg), daemon=True,
                         name="wfd-stream").start()

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: the server is stopping
            pass

    def _run(self, daemon: Daemon, msg: protocol.Message) -> None:
        try:
            conn = daemon.open()
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conn = conn
            for reply in conn.stream(msg):
                self._put(reply)
                if isinstance(reply, self.END):
                    break
            self._put(None)
        except Exception as e:  # reported to the page; after close() nobody listens
            if not self._closed:
                self._put(e)
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


# ---- guard: host, token, origin ------------------------------------------------------------


def _same(given: str, token: str) -> bool:
    return secrets.compare_digest(given.encode(), token.encode())


def _refuse(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=f"wfctl web: {text}\n")


@web.middleware
async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
    app = request.app
    if request.host not in app[HOSTS]:
        return _refuse(403, f"refused: wrong Host header {request.host!r} (this page answers "
                            "only as 127.0.0.1 or localhost, against DNS rebinding)")
    token = app[TOKEN]
    given = request.query.get("token")
    if given is not None:
        if not _same(given, token):
            return _refuse(403, "refused: wrong token")
        if request.method == "GET" and not request.path.startswith("/api/"):
            # Into a cookie, and out of the address bar (history, screenshots).
            rest = {k: v for k, v in request.query.items() if k != "token"}
            response = web.Response(status=302, headers={
                "Location": request.path + ("?" + urlencode(rest) if rest else "")})
            response.set_cookie(app[COOKIE], token, httponly=True, samesite="Strict", path="/")
            return response
    elif not _same(request.cookies.get(app[COOKIE], ""), token):
        return _refuse(403, "refused: no token (open the address `wfctl web` printed, "
                            "which ends in ?token=...)")
    if request.method not in ("GET", "HEAD"):
        if request.headers.get("X-Wfd") != "1":
            return _refuse(403, "refused: a change needs the header X-Wfd: 1")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.host}":
            return _refuse(403, f"refused: request from another origin ({origin})")
    return await handler(request)


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response: nothing cached, framed, sniffed or loaded from elsewhere."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    )


# ---- pages and API -------------------------------------------------------------------------


def _page(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / PAGES[name]).read_bytes(),
                            content_type="text/html", charset="utf-8")
    return handler


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.Response(body=(STATIC / name).read_bytes(), content_type=ASSETS[name],
                        charset="utf-8")


def _json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(obj), status=status, content_type="application/json")


def _error(e: WfdError) -> web.Response:
    """A daemon's refusal (unknown run, a state that refuses) is the client's 4xx; a daemon
    that cannot be reached is a bad gateway."""
    status = 400 if isinstance(e, ReplyError) and e.exit_code == EXIT_USAGE else 502
    return _json_response({"error": e.message, "code": e.exit_code}, status)


def api(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Callable:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except WfdError as e:
            return _error(e)
    return wrapped


@api
async def runs(request: web.Request) -> web.Response:
    """Runs this user may see, newest first; `?state=A,B` and `?name=text` filter them."""
    listed = (await request.app[DAEMON].call(protocol.Status(), protocol.RunList)).runs
    states = {s for s in request.query.get("state", "").split(",") if s}
    name = request.query.get("name", "").strip()
    shown = [r for r in listed if (not states or r.state in states) and name in r.name]
    shown.sort(key=lambda r: r.run_id, reverse=True)  # run ids sort by creation time
    counts: dict[str, int] = {}
    for r in listed:
        counts[r.state] = counts.get(r.state, 0) + 1
    return _json_response({"runs": shown, "counts": counts, "total": len(listed)})


@api
async def run(request: web.Request) -> web.Response:
    """One run: its status, its DAG as SVG (every state in the legend: it will change)."""
    run_id = request.match_info["run_id"]
    status = (await request.app[DAEMON].call(protocol.Status(run_id=run_id),
                                             protocol.RunInfo)).status
    # The title without the run's state, which the page shows (and updates) above it.
    picture = replace(graph.from_status(status), title=f"{status.name}  {status.run_id}")
    dag = graph.svg(picture, legend=graph.STATES)
    return _json_response({"status": status, "dag": dag, "actions": list(ACTIONS)})


@api
async def action(request: web.Request) -> web.Response:
    run_id, name = request.match_info["run_id"], request.match_info["action"]
    if name not in ACTIONS:
        raise web.HTTPNotFound()
    build, kind = ACTIONS[name]
    reply = await request.app[DAEMON].call(build(run_id), kind)
    return _json_response(reply)


async def _sse_start(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    return response


async def _sse(response: web.StreamResponse, event: str, data: object) -> None:
    await response.write(b"event: " + event.encode() + b"\ndata: " + _json.encode(data)
                         + b"\n\n")


async def _batch(queue: asyncio.Queue[Any]) -> list[Any]:
    """What arrives within TICK (nothing on a quiet run), and whatever follows within
    COALESCE: one update per burst of events, not one per event."""
    try:
        items = [await asyncio.wait_for(queue.get(), TICK)]
    except asyncio.TimeoutError:
        return []
    deadline = time.monotonic() + COALESCE
    while (left := deadline - time.monotonic()) > 0:
        try:
            items.append(await asyncio.wait_for(queue.get(), left))
        except asyncio.TimeoutError:
            break
    return items


def _view(status: Any, events: list[Any], now: float) -> dict[str, object]:
    segs = timeline.segments(events)
    return {
        "status": status,
        "gantt": timeline.gantt_svg(status, segs, now),
        "seq": events[-1].seq if events else 0,
        "transitions": [f"{e.ts}  {describe(e)}" for e in events[-MAX_LOG_EVENTS:]],
    }


def _failure(e: WfdError) -> dict[str, object]:
    """A stream's end by error; `code` 2 is for good (no such run), others may pass (the
    daemon restarting), and the page tries again."""
    return {"error": e.message, "code": e.exit_code}


async def run_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events for one run: `update` while it runs (after each burst of events,
    and every TICK), `end` once it is over, `failure` if the daemon refuses or goes away."""
    run_id = request.match_info["run_id"]
    daemon: Daemon = request.app[DAEMON]
    response = await _sse_start(request)
    stream = Stream(daemon, protocol.Watch(run_id=run_id))
    events: list[Any] = []
    try:
        while True:
            ended = None
            for item in await _batch(stream.queue):
                if isinstance(item, protocol.Progress):
                    events.extend(item.events)
                elif isinstance(item, protocol.RunEnded):
                    ended = item.status
                    break  # the stream's end marker (None) follows: not a failure
                elif isinstance(item, WfdError):
                    await _sse(response, "failure", _failure(item))
                    return response
                elif item is None or isinstance(item, Exception):
                    await _sse(response, "failure", {"error": f"the stream ended: {item}"})
                    return response
            if ended is not None:
                await _sse(response, "end", _view(ended, events, time.time()))
                return response
            try:
                status = (await daemon.call(protocol.Status(run_id=run_id),
                                            protocol.RunInfo)).status
            except WfdError as e:
                await _sse(response, "failure", _failure(e))
                return response
            await _sse(response, "update", _view(status, events, time.time()))
    except ConnectionError:
        return response  # the page went away
    finally:
        stream.close()


async def step_log(request: web.Request) -> web.StreamResponse:
    """Server-sent events of a step's log: `chunk` {attempt, text}, then `end`
    {attempt, step_state}. `?attempt=N`: that attempt; else every attempt, earlier ones
    first. `?follow=1` streams until the step is over, going on to its next attempts."""
    run_id, step = request.match_info["run_id"], request.match_info["step"]
    attempt_text = request.query.get("attempt", "")
    attempt = int(attempt_text) if attempt_text.isdigit() and int(attempt_text) > 0 else None
    follow = request.query.get("follow") == "1"
    daemon: Daemon = request.app[DAEMON]
    response = await _sse_start(request)
    decoders: dict[int, codecs.IncrementalDecoder] = {}
    earlier = 0
    if attempt is None:
        # `Logs` without an attempt starts at the latest one; show the earlier ones first.
        try:
            status = (await daemon.call(protocol.Status(run_id=run_id), protocol.RunInfo)).status
        except WfdError as e:
            await _sse(response, "failure", {"error": e.message})
            return response
        step_status = status.steps.get(step)
        earlier = step_status.attempts - 1 if step_status else 0
    try:
        for n in range(1, earlier + 1):
            if not isinstance(await _forward(response, daemon, decoders, protocol.Logs(
                    run_id=run_id, step=step, attempt=n)), protocol.LogEnd):
                return response
        end = await _forward(response, daemon, decoders, protocol.Logs(
            run_id=run_id, step=step, attempt=attempt, follow=follow))
        if isinstance(end, protocol.LogEnd):
            await _sse(response, "end", end)
    except ConnectionError:
        pass  # the page went away
    return response


async def _forward(response: web.StreamResponse, daemon: Daemon,
                   decoders: dict[int, codecs.IncrementalDecoder],
                   request: protocol.Logs) -> protocol.LogEnd | None:
    """Send one `Logs` stream's output as `chunk`s; its LogEnd, or None after a `failure`."""
    stream = Stream(daemon, request)
    try:
        while True:
            item = await stream.queue.get()
            if isinstance(item, protocol.LogData):
                decoder = decoders.setdefault(
                    item.attempt, codecs.getincrementaldecoder("utf-8")("replace"))
                await _sse(response, "chunk", {"attempt": item.attempt,
                                               "text": decoder.decode(item.data)})
            elif isinstance(item, protocol.LogEnd):
                return item
            else:
                error = item.message if isinstance(item, WfdError) else f"ended: {item}"
                await _sse(response, "failure", {"error": error})
                return None
    finally:
        stream.close()


def make_app(daemon: Daemon, token: str, port: int) -> web.Application:
    app = web.Application(middlewares=[guard])
    app[DAEMON] = daemon
    app[TOKEN] = token
    app[COOKIE] = f"wfd_token_{port}"  # cookies ignore ports: one per `wfctl web`
    app[HOSTS] = frozenset({f"127.0.0.1:{port}", f"localhost:{port}"})
    app.on_response_prepare.append(_headers)
    app.router.add_get("/", _page("runs"))
    app.router.add_get("/run/{run_id}", _page("run"))
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/api/runs", runs)
    app.router.add_get("/api/runs/{run_id}", run)
    app.router.add_get("/api/runs/{run_id}/events", run_events)
    app.router.add_get("/api/runs/{run_id}/logs/{step}", step_log)
    app.router.add_post("/api/runs/{run_id}/{action}", action)
    return app


# ---- serve ------------------------------------------------------------------------------


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(first: Connection, port: int, open_browser: bool) -> int:
    """Serve until SIGINT or SIGTERM; print the address (with its token) on stdout."""
    daemon = Daemon(first)
    sock = _listen(port)
    return asyncio.run(_serve(daemon, sock, open_browser))


async def _serve(daemon: Daemon, sock: socket.socket, open_browser: bool) -> int:
    port = sock.getsockname()[1]
    token = secrets.token_urlsafe(32)
    runner = web.AppRunner(make_app(daemon, token, port), access_log=None,
                           handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    url = f"http://127.0.0.1:{port}/?token={token}"
    print(url, flush=True)
    print(f"wfctl: serving the runs of wfd at {daemon.path} on http://127.0.0.1:{port}/ "
          "(Ctrl-C stops)", file=sys.stderr, flush=True)
    if open_browser:
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0
