"""The remote sandbox's HTTP server (`python -m nemo_prorl.confine.remote` starts it; the protocol
and authentication are described there).

Serving: one thread owns all sockets (a `selectors` loop). It accepts connections and reads requests
without blocking, each connection with one deadline for its whole request (--request-timeout-s: a client
trickling bytes is dropped then, with a 408 where the socket takes it). The token is checked as soon as its
header line is in (RemoteSandbox sends it right after the request line), so a slow client is authenticated
long before its headers end. At most --max-connections are open. At the cap, a new connection pushes out
an unauthenticated one that has already been answered, else the oldest "tokenless" one (its request line
and first 4 header lines, or 8 KiB of head, are in without the right Authorization line, or that line is
wrong: it is answered 401 and closed at once), else the oldest unauthenticated one that has been open
--auth-grace-s or longer; an authenticated connection is never pushed out. When there is no such connection
the server stops accepting until there is (or a place frees): new connections wait in the kernel's listen
backlog, first come first served, instead of being closed. So a flood that sends headers without the token
loses each place as soon as its first header lines are read, and the backlog keeps moving; a client whose
head arrives in one piece is judged on all of it (an Authorization line after the 4th header line is fine
then), but under a flood a client should send it among its first 4 header lines, as RemoteSandbox does.
A flood of connections that send nothing, or trickle less than those bounds (a slow honest client looks the
same), is bounded by the grace alone: each place it holds is given up --auth-grace-s after it was taken (at
256 places and 2 s, 128 connections a second turn over), so an honest client waits in the backlog behind
it; an honest client, once accepted, holds its place from the moment its Authorization line is read. What
remains is a network-level denial of service (a SYN flood, or silent connections filling the backlog faster
than the grace turns it over): no HTTP server can bound that; put the server on a private network or behind
a firewall that admits only the trainers. A complete, authenticated request goes to a pool of --workers
threads with --queue-size places waiting; when those are taken it is answered 503 at once. Answers are
written by the same loop, each within --send-timeout-s. So threads never grow with clients: 1 + workers.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import math
import select
import selectors
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
MAX_REQUEST_BYTES = 64 << 20  # the body of one POST /run
MAX_CODE_BYTES = 1 << 20  # "code", UTF-8
MAX_TESTS = 512  # len("inputs")
MAX_HEADER_BYTES = 64 << 10  # request line and headers
MAX_CONNECTIONS = 256
REQUEST_TIMEOUT_S = 10.0  # headers and body of one request, in total
# At the cap, how long an accepted connection keeps its place while it has not shown the token. An honest
# client sends the token in its first ~100 bytes; a flood's connections never do and are pushed out then.
AUTH_GRACE_S = 2.0
# ... unless it has shown it is no client of ours: its request line and first AUTH_HEAD_LINES header lines (or
# AUTH_HEAD_BYTES of head, whichever comes first) are in without the right Authorization line. RemoteSandbox
# sends it as its first or second header line (after Accept-Encoding), well inside both bounds.
AUTH_HEAD_LINES = 4
AUTH_HEAD_BYTES = 8 << 10  # a request line and an Authorization line with a 4 KiB token (load_token's most)
SEND_TIMEOUT_S = 30.0  # writing one answer, in total
LINGER_S = 2.0  # after an answer: read (and drop) what the client still sends, so the answer is not reset
LINGER_BYTES = 4 << 20


def check_token(token: str, where: str = "the sandbox token") -> None:
    if len(token) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
        raise ValueError(f"{where}: the token must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
                         f"without spaces (e.g. secrets.token_hex(32))")


_REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _response(status: int, payload: Optional[dict], extra: Sequence[str] = ()) -> bytes:
    body = json.dumps(payload).encode() if payload is not None else b""
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _BadRequest(Exception):
    pass


class _Conn:
    """One client connection; only the loop thread touches it. States: head -> body -> busy (in the pool)
    -> write -> linger; an error answer goes from head or body straight to write."""

    __slots__ = ("id", "sock", "state", "buf", "scan", "need", "deadline", "accepted", "events", "out", "sent",
                 "dropped", "authed", "line_at", "lines", "tokenless")

    def __init__(self, cid: int, sock: socket.socket, now: float) -> None:
        self.id, self.sock, self.state, self.accepted = cid, sock, "head", now
        self.buf = bytearray()
        self.scan = 0  # the end of the headers is searched from here
        self.need = 0  # body bytes
        self.deadline = math.inf
        self.events = 0  # registered with the selector
        self.out: memoryview = memoryview(b"")
        self.sent = 0
        self.dropped = 0  # bytes read while lingering
        self.authed = False  # showed the right token: never pushed out for a new connection
        self.line_at = 0  # the next header line to look at for the token starts here
        self.lines = 0  # complete header lines looked at (the request line not counted)
        self.tokenless = False  # its first header lines came without the token: pushed out first at the cap


class SandboxServer:
    """The server; `serve()` builds one. Same use as socketserver's: `server_address`, `serve_forever()`
    (in the thread that will own the sockets), `shutdown()` from another thread, `server_close()`."""

    def __init__(self, host: str, port: int, sandbox: Any, token: str, *, workers: int, queue_size: int,
                 max_connections: int = MAX_CONNECTIONS, request_timeout_s: float = REQUEST_TIMEOUT_S,
                 send_timeout_s: float = SEND_TIMEOUT_S, max_tests: int = MAX_TESTS,
                 max_code_bytes: int = MAX_CODE_BYTES, max_request_bytes: int = MAX_REQUEST_BYTES,
                 auth_grace_s: float = AUTH_GRACE_S) -> None:
        check_token(token)
        for name, v in (("workers", workers), ("max_connections", max_connections),
                        ("request_timeout_s", request_timeout_s), ("send_timeout_s", send_timeout_s),
                        ("max_tests", max_tests), ("max_code_bytes", max_code_bytes),
                        ("max_request_bytes", max_request_bytes)):
            if not v > 0:
                raise ValueError(f"sandbox server: {name} must be > 0, got {v}")
        if queue_size < 0:
            raise ValueError(f"sandbox server: queue_size must be >= 0, got {queue_size}")
        if not auth_grace_s >= 0:
            raise ValueError(f"sandbox server: auth_grace_s must be >= 0, got {auth_grace_s}")
        self.auth_grace_s = auth_grace_s
        self.sandbox = sandbox
        self._token = token.encode("ascii")
        self.workers, self.queue_size, self.max_connections = workers, queue_size, max_connections
        self.request_timeout_s, self.send_timeout_s = request_timeout_s, send_timeout_s
        self.max_tests, self.max_code_bytes, self.max_request_bytes = max_tests, max_code_bytes, max_request_bytes
        self.runs = 0  # programs handed to the sandbox
        self.in_flight = 0  # requests running or queued in the pool
        self._runs_lock = threading.Lock()

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=1024)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.socket, selectors.EVENT_READ, "accept")
        self._pending = select.poll()  # whether a connection waits to be accepted
        self._pending.register(self.socket, select.POLLIN)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox-run")
        self._done: deque[tuple[int, bytes]] = deque()  # answers from the pool, for the loop to write
        self._conns: dict[int, _Conn] = {}  # in order of arrival
        self._ids = itertools.count()
        self._next_deadline = math.inf
        self._paused = False  # at the cap with no connection to push out: new ones wait in the listen backlog
        self._accept_at = math.inf  # while paused: when the oldest unauthenticated connection's grace ends
        self._stopping = False
        self._closed = False
        self._idle = threading.Event()
        self._idle.set()
        self._loop_thread: Optional[threading.Thread] = None

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def authenticated(self) -> int:
        """Open connections that have shown the right token."""
        return sum(c.authed for c in list(self._conns.values()))

    # ----------------------------------------------------------------------------------- socketserver-like

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        if self._closed:
            raise ValueError("sandbox server is closed")
        self._idle.clear()
        self._loop_thread = threading.current_thread()
        try:
            while not self._stopping:
                wake_at = min(self._next_deadline, self._accept_at)
                wait = min(poll_interval, max(0.0, wake_at - time.monotonic()))
                for key, events in self._sel.select(wait):
                    self._dispatch(key.data, events)
                self._write_answers()
                now = time.monotonic()
                self._expire(now)
                if self._paused and (len(self._conns) < self.max_connections or now >= self._accept_at):
                    self._paused, self._accept_at = False, math.inf
                    self._sel.register(self.socket, selectors.EVENT_READ, "accept")
                    self._accept()
        finally:
            self._stopping = False  # as in socketserver: a shutdown() asked before the loop ran stops it at once
            self._loop_thread = None
            self._idle.set()

    def shutdown(self) -> None:
        """Stop serve_forever and wait until it has returned (returns at once when it is not running)."""
        self._stopping = True
        self._wake()
        if self._loop_thread is not threading.current_thread():
            self._idle.wait()

    def server_close(self) -> None:
        if self._closed:
            return
        self.shutdown()
        self._closed = True
        for conn in list(self._conns.values()):
            self._close(conn)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sel.close()
        for s in (self.socket, self._wake_r, self._wake_w):
            s.close()

    def __enter__(self) -> "SandboxServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.server_close()

    # ------------------------------------------------------------------------------------------- the loop

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def _dispatch(self, what: Any, events: int) -> None:
        if what == "accept":
            return self._accept()
        if what == "wake":
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass
            return
        conn: _Conn = what
        try:
            if events & selectors.EVENT_READ and conn.state in ("head", "body", "linger"):
                self._on_read(conn)
            elif events & selectors.EVENT_WRITE and conn.state == "write":
                self._on_write(conn)
        except Exception:  # noqa: BLE001  one bad connection must not stop the server
            log.exception("sandbox server: connection %d failed", conn.id)
            self._close(conn)

    def _watch(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if not events:
            self._sel.unregister(conn.sock)
        elif not conn.events:
            self._sel.register(conn.sock, events, conn)
        else:
            self._sel.modify(conn.sock, events, conn)
        conn.events = events

    def _set_deadline(self, conn: _Conn, deadline: float) -> None:
        conn.deadline = deadline
        self._next_deadline = min(self._next_deadline, deadline)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.id, None)
        if conn.events:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.events = 0
        conn.sock.close()
        conn.state = "closed"

    def _accept(self) -> None:
        for _ in range(64):  # then let the others have a turn
            now = time.monotonic()
            if len(self._conns) >= self.max_connections:
                if not self._pending.poll(0):  # push nobody out for a newcomer that is not there
                    return
                if not self._make_room(now):
                    return  # paused: the newcomer waits in the listen backlog, not closed
            try:
                sock, _addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors; the client retries
                log.warning("sandbox server: accept failed: %s", e)
                return
            sock.setblocking(False)
            conn = _Conn(next(self._ids), sock, now)
            self._conns[conn.id] = conn
            self._set_deadline(conn, now + self.request_timeout_s)
            self._watch(conn, selectors.EVENT_READ)

    def _make_room(self, now: float) -> bool:
        """At the cap: close an unauthenticated connection that was answered already, else the oldest
        tokenless one (with a 401: see _check_token_early), else the oldest unauthenticated one past its
        grace. Never an authenticated one: a newcomer is unknown, and pushing out a client that showed the
        token for it would let a flood starve honest clients (the oldest connection is typically the slow
        honest one). When none can go, stop accepting until the oldest unauthenticated
        connection's grace ends or a place frees: the newcomer waits in the kernel's backlog, in order."""
        oldest: Optional[_Conn] = None
        tokenless: Optional[_Conn] = None
        for conn in self._conns.values():  # oldest first
            if conn.authed or conn.state in ("body", "busy"):  # body and busy imply the token
                continue
            if conn.state in ("write", "linger"):  # a 401/404/health answer: nothing owed to it
                self._close(conn)
                return True
            if oldest is None:
                oldest = conn
            if tokenless is None and conn.tokenless:
                tokenless = conn
        if tokenless is not None:  # no client of ours: it goes without waiting for its grace
            self._push_out_tokenless(tokenless)
            return True
        if oldest is not None and now - oldest.accepted >= self.auth_grace_s:
            self._close(oldest)
            return True
        self._paused = True
        self._accept_at = math.inf if oldest is None else oldest.accepted + self.auth_grace_s
        self._sel.unregister(self.socket)
        return False

    def _push_out_tokenless(self, conn: _Conn) -> None:
        try:  # best effort, as a 408: the socket may not take it, or the close may reset it
            conn.sock.send(_response(401, {"error": f"server full: dropped a connection whose request line and "
                                                    f"first {AUTH_HEAD_LINES} header lines (or {AUTH_HEAD_BYTES} "
                                                    f"bytes) came without Authorization: Bearer <token>"},
                                     ["WWW-Authenticate: Bearer"]))
        except OSError:
            pass
        self._close(conn)

    def _expire(self, now: float) -> None:
        if now < self._next_deadline:
            return
        nxt = math.inf
        for conn in list(self._conns.values()):
            if conn.state == "busy":
                continue
            if conn.deadline <= now:
                if conn.state in ("head", "body"):  # the request took too long: 408 if the socket takes it
                    try:
                        conn.sock.send(_response(408, {"error": f"request not complete within "
                                                                f"{self.request_timeout_s:g} s (request_timeout_s)"}))
                    except OSError:
                        pass
                self._close(conn)
            else:
                nxt = min(nxt, conn.deadline)
        self._next_deadline = nxt

    def _on_read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._close(conn)
        if not data:  # the client is gone (or has half-closed before finishing its request)
            return self._close(conn)
        if conn.state == "linger":
            conn.dropped += len(data)
            if conn.dropped > LINGER_BYTES:
                self._close(conn)
            return
        conn.buf += data
        if conn.state == "head":
            if not conn.authed:
                self._check_token_early(conn)
            end = conn.buf.find(b"\r\n\r\n", conn.scan)
            if end < 0:
                conn.scan = max(0, len(conn.buf) - 3)
                if len(conn.buf) > MAX_HEADER_BYTES:
                    self._answer(conn, 400, {"error": f"request headers exceed {MAX_HEADER_BYTES} bytes "
                                                      f"(max_header_bytes)"})
                return
            if end > MAX_HEADER_BYTES:
                return self._answer(conn, 400, {"error": f"request headers exceed {MAX_HEADER_BYTES} bytes "
                                                         f"(max_header_bytes)"})
            head = bytes(conn.buf[:end])
            del conn.buf[:end + 4]
            try:
                self._on_head(conn, head)
            except _BadRequest as e:
                return self._answer(conn, 400, {"error": f"bad request: {e}"})
        if conn.state == "body" and len(conn.buf) >= conn.need:
            body = bytes(conn.buf[:conn.need])
            conn.buf = bytearray()
            self._submit(conn, body)

    def _check_token_early(self, conn: _Conn) -> None:
        """Mark the connection authenticated as soon as a complete `Authorization` line with the right token
        is in, before the rest of its headers: a slow client is then safe from being pushed out. Only the
        protection comes early; whether the request is accepted (one Authorization header, and so on) is
        decided on the whole head, as before. Mark it tokenless when its request line and first
        AUTH_HEAD_LINES header lines (or AUTH_HEAD_BYTES) are in without the right token, or its Authorization
        line is wrong: at the cap it is pushed out at once, not after the grace (_make_room). Each byte is
        looked at once."""
        buf = conn.buf
        while not conn.authed:
            nl = buf.find(b"\r\n", conn.line_at)
            if nl < 0 or nl == conn.line_at:  # no complete line yet, or the end of the headers
                break
            start, conn.line_at = conn.line_at, nl + 2
            if start == 0:  # the request line
                continue
            conn.lines += 1
            name, sep, value = bytes(buf[start:nl]).partition(b":")
            if sep and name.lower() == b"authorization":
                conn.authed = self._authorized([value.decode("latin-1").strip()])
                if not conn.authed:
                    self._mark_tokenless(conn)
        if not conn.authed and (conn.lines >= AUTH_HEAD_LINES or len(buf) > AUTH_HEAD_BYTES):
            self._mark_tokenless(conn)

    def _mark_tokenless(self, conn: _Conn) -> None:
        if not conn.tokenless:
            conn.tokenless = True
            self._room_appeared()

    def _room_appeared(self) -> None:
        """An unauthenticated connection can now be pushed out at once (tokenless, or answered): while paused,
        accept again at the next turn of the loop instead of at the end of the oldest one's grace."""
        if self._paused:
            self._accept_at = -math.inf

    def _on_head(self, conn: _Conn, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest("malformed request line")
        method, target, _version = parts
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or " " in name:
                raise _BadRequest("malformed header line")
            headers.setdefault(name.lower(), []).append(value.strip())

        if method == "GET" and target == "/health":
            namespaces = bool(getattr(self.sandbox, "namespaces", False))
            return self._answer(conn, 200, {"ok": True, "namespaces": namespaces})
        conn.authed = self._authorized(headers.get("authorization", []))
        if not conn.authed:
            return self._answer(conn, 401, {"error": "missing or wrong token: send Authorization: Bearer <token>"},
                                ["WWW-Authenticate: Bearer"])
        if target != "/run":
            return self._answer(conn, 404, {"error": "unknown path"})
        if method != "POST":
            return self._answer(conn, 405, {"error": "POST /run"}, ["Allow: POST"])
        if "transfer-encoding" in headers:
            raise _BadRequest("no Transfer-Encoding: send the body with a Content-Length")
        lengths = set(headers.get("content-length", []))
        n = lengths.pop() if len(lengths) == 1 else ""
        if not (n.isascii() and n.isdigit() and len(n) <= 20 and 0 < int(n) <= self.max_request_bytes):
            raise _BadRequest(f"Content-Length must be one number in 1..{self.max_request_bytes} (max_request_bytes)")
        if [v.lower() for v in headers.get("expect", [])] == ["100-continue"]:
            try:  # the send buffer is empty here; if it does not take it, the client sends the body anyway
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass
        conn.state, conn.need = "body", int(n)

    def _authorized(self, values: list[str]) -> bool:
        if len(values) != 1:
            return False
        scheme, _, cred = values[0].partition(" ")
        ok = hmac.compare_digest(cred.strip().encode("latin-1"), self._token)
        return ok and scheme.lower() == "bearer"

    def _submit(self, conn: _Conn, body: bytes) -> None:
        if self.in_flight >= self.workers + self.queue_size:
            return self._answer(conn, 503, {"error": f"server busy: {self.workers} runs going and "
                                                     f"{self.queue_size} waiting (workers, queue_size)"},
                                ["Retry-After: 1"])
        self.in_flight += 1
        conn.state = "busy"
        self._watch(conn, 0)  # no deadline while it runs: the sandbox bounds the run itself
        self._pool.submit(self._work, conn.id, body)

    def _work(self, cid: int, body: bytes) -> None:
        """In a pool thread: check the request, run it, leave the answer for the loop."""
        try:
            status, payload = self._run(body)
            data = _response(status, payload)
        except BaseException as e:  # noqa: BLE001  the client gets an answer whatever happens
            log.exception("sandbox server: run failed")
            data = _response(500, {"error": f"sandbox server: {type(e).__name__}"})
        self._done.append((cid, data))
        self._wake()

    def _run(self, body: bytes) -> tuple[int, dict]:
        try:
            req = json.loads(body)
        except ValueError as e:
            return 400, {"error": f"bad request: the body is not JSON: {e}"}
        if not isinstance(req, dict):
            return 400, {"error": "bad request: the body must be a JSON object"}
        code, inputs = req.get("code"), req.get("inputs")
        if not isinstance(code, str):
            return 400, {"error": "bad request: 'code' must be a string"}
        if not isinstance(inputs, list):
            return 400, {"error": "bad request: 'inputs' must be a list of strings"}
        if len(inputs) > self.max_tests:
            return 400, {"error": f"bad request: {len(inputs)} inputs, more than max_tests={self.max_tests}"}
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                return 400, {"error": f"bad request: inputs[{i}] must be a string"}
        size = len(code.encode("utf-8", "surrogatepass"))
        if size > self.max_code_bytes:
            return 400, {"error": f"bad request: code of {size} bytes, more than max_code_bytes={self.max_code_bytes}"}
        driver = req.get("driver", False)
        if not isinstance(driver, bool):
            return 400, {"error": "bad request: 'driver' must be true or false"}
        with self._runs_lock:
            self.runs += 1
        # the server's own harness runs the function tests: a client sends requests, never harness code
        return 200, asdict(self.sandbox.run(code, inputs, driver=True) if driver else self.sandbox.run(code, inputs))

    def _write_answers(self) -> None:
        while self._done:
            cid, data = self._done.popleft()
            self.in_flight -= 1
            conn = self._conns.get(cid)
            if conn is not None:
                self._send(conn, data)

    def _answer(self, conn: _Conn, status: int, payload: dict, extra: Sequence[str] = ()) -> None:
        self._send(conn, _response(status, payload, extra))

    def _send(self, conn: _Conn, data: bytes) -> None:
        conn.state, conn.out, conn.sent, conn.buf = "write", memoryview(data), 0, bytearray()
        if not conn.authed:  # answered (401, health, ...): its place may go to a newcomer at once
            self._room_appeared()
        self._set_deadline(conn, time.monotonic() + self.send_timeout_s)
        self._watch(conn, selectors.EVENT_WRITE)
        self._on_write(conn)

    def _on_write(self, conn: _Conn) -> None:
        try:
            while conn.sent < len(conn.out):
                conn.sent += conn.sock.send(conn.out[conn.sent:conn.sent + (1 << 20)])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._close(conn)
        conn.out = memoryview(b"")
        # Half-close, then read and drop what the client still sends until it closes: closing a socket with
        # unread request bytes would reset the connection and could destroy the answer before it is read.
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self._close(conn)
        conn.state = "linger"
        self._set_deadline(conn, time.monotonic() + LINGER_S)
        self._watch(conn, selectors.EVENT_READ)
