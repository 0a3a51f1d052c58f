"""A sandbox on another host, for clusters whose GPU nodes must not run untrusted code (reward.sandbox.
backend=remote, reward.sandbox.url=http://host:port, reward.sandbox.token_file=PATH). The server is this
module:

    umask 077; python -c 'import secrets; print(secrets.token_hex(32))' > /etc/prorl-sandbox.token
    python -m nemo_prorl.rewards.sandbox_remote --host 0.0.0.0 --port 8080 --token-file /etc/prorl-sandbox.token \
        [--workers 16] [--queue-size 64] [--max-connections 256] [--request-timeout-s 10] [--max-tests 512]

It runs each request in a `LocalSandbox` with the limits it was started with (a client cannot loosen them).

Authentication: a shared secret (at least 16 printable ASCII characters, no spaces), from --token-file (a
file that group and others can neither read nor write; the server refuses to start otherwise) or else
env PRORL_SANDBOX_TOKEN. Without one the server does not start. Clients (`RemoteSandbox`) read the same
secret from reward.sandbox.token_file or env PRORL_SANDBOX_TOKEN and send `Authorization: Bearer <token>`;
a request without the right token is answered 401 as soon as its headers are in, before its body is read.

Protocol (JSON over HTTP/1.1, one request per connection; the server closes it after the answer):
    POST /run   {"code": "<python source>", "inputs": ["<stdin of test 0>", ...], "driver": false}
                (with "driver": true each input is a request for the function-test harness,
                 sandbox_driver.py, and "result" carries what it wrote)
      200 ->    {"tests": [{"status": "ok"|"runtime_error"|"timeout"|"killed"|"output_limit"|"file_size_limit"
                                      |"memory_limit"|"process_limit",
                            "returncode": int|null, "stdout": str, "stderr": str, "wall_s": float,
                            "result": str}, ...],
                 "error": "", "wall_s": float, "notes": [str, ...]}
      400 ->    {"error": "<what is wrong with the request; a limit it breaks is named, e.g. max_tests>"}
      401 ->    {"error": ...}  no or a wrong `Authorization: Bearer <token>` (nothing was read or run)
      408 ->    the request (headers and body) did not arrive within --request-timeout-s (then closed)
      503 ->    {"error": ...}  all workers busy and the queue full: try again later
    GET /health -> {"ok": true, "namespaces": bool}   (no token needed; it tells nothing else)

Limits (each violation is a 400 naming it): --max-tests inputs per request (512), --max-code-bytes of
source (1 MiB), --max-request-bytes of body (64 MiB, Content-Length required, no chunked bodies), 64 KiB of
headers; "code" must be a string and "inputs" a list of strings.

Serving: one thread owns all sockets (a `selectors` loop). It accepts connections and reads requests
without blocking, each connection with one deadline for its whole request (--request-timeout-s: a client
trickling bytes is dropped then, with a 408 where the socket takes it). At most --max-connections are open;
a new one beyond that pushes out the oldest connection still sending its request (unauthenticated ones
first), or is closed at once when none is. A complete, authenticated request goes to a pool of --workers
threads with --queue-size places waiting; when those are taken it is answered 503 at once. Answers are
written by the same loop, each within --send-timeout-s. So threads never grow with clients: 1 + workers.
"""

from __future__ import annotations

import argparse
import hmac
import itertools
import json
import logging
import math
import os
import selectors
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Optional, Sequence

from nemo_prorl.config.schema import SandboxConfig
from nemo_prorl.rewards.sandbox import SANDBOXES, LocalSandbox, SandboxRun, UnconfinedError

log = logging.getLogger(__name__)

TOKEN_ENV = "PRORL_SANDBOX_TOKEN"
MIN_TOKEN_CHARS = 16
MAX_REQUEST_BYTES = 64 << 20  # the body of one POST /run
MAX_CODE_BYTES = 1 << 20  # "code", UTF-8
MAX_TESTS = 512  # len("inputs")
MAX_HEADER_BYTES = 64 << 10  # request line and headers
MAX_CONNECTIONS = 256
REQUEST_TIMEOUT_S = 10.0  # headers and body of one request, in total
SEND_TIMEOUT_S = 30.0  # writing one answer, in total
LINGER_S = 2.0  # after an answer: read (and drop) what the client still sends, so the answer is not reset
LINGER_BYTES = 4 << 20


# --------------------------------------------------------------------------------------------- the token


def load_token(token_file: str, setting: str) -> str:
    """The shared secret from `token_file` (which group and others must not be able to read or write) or,
    when that is empty, from env PRORL_SANDBOX_TOKEN. ValueError naming `setting` when there is none or it
    is unfit."""
    if token_file:
        try:
            fd = os.open(token_file, os.O_RDONLY)
        except OSError as e:
            raise ValueError(f"{setting}: cannot open the sandbox token file {token_file!r}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())  # of the file opened, not of whatever the path names by now
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{setting}: the sandbox token file {token_file!r} is not a regular file")
            if st.st_mode & 0o077:
                raise ValueError(
                    f"{setting}: the sandbox token file {token_file!r} is readable or writable by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):o}); refusing to use it. Run: chmod 600 {token_file}")
            token = f.read(4096).decode("utf-8", "replace").strip()
        where = f"the sandbox token file {token_file!r}"
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        where = f"env {TOKEN_ENV}"
        if not token:
            raise ValueError(f"{setting} is not set and env {TOKEN_ENV} is empty: the sandbox server needs a "
                             f"shared secret (a file of mode 600 holding e.g. secrets.token_hex(32))")
    check_token(token, f"{setting} ({where})")
    return token


def check_token(token: str, where: str = "the sandbox token") -> None:
    if len(token) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
        raise ValueError(f"{where}: the token must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
                         f"without spaces (e.g. secrets.token_hex(32))")


# --------------------------------------------------------------------------------------------- the client


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None  # a redirect would carry the token to another address: it stays an HTTP error


class RemoteSandbox:
    def __init__(self, cfg: SandboxConfig) -> None:
        if not cfg.url:
            raise ValueError("reward.sandbox.url must be set when reward.sandbox.backend=remote")
        self.url = cfg.url.rstrip("/") + "/run"
        self.timeout = cfg.total_timeout_s + 30.0  # server-side queueing plus the run itself
        self._auth = "Bearer " + load_token(cfg.token_file, "reward.sandbox.token_file")
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:
        return f"RemoteSandbox({self.url!r})"

    def run(self, code: str, inputs: Sequence[str], driver: bool = False) -> SandboxRun:
        body = json.dumps({"code": code, "inputs": list(inputs), "driver": driver}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json",
                                                                   "Authorization": self._auth})
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                return SandboxRun.from_json(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            return SandboxRun(error=f"sandbox server {self.url}: HTTP {e.code}: {e.read()[:300]!r}")
        except (urllib.error.URLError, OSError, ValueError, TypeError, KeyError) as e:  # incl. a bad reply
            return SandboxRun(error=f"sandbox server {self.url}: {type(e).__name__}: {e}")


SANDBOXES.register("remote")(RemoteSandbox)


# --------------------------------------------------------------------------------------------- the server

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
                 "dropped")

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


class SandboxServer:
    """The server; `serve()` builds one. Same use as socketserver's: `server_address`, `serve_forever()`
    (in the thread that will own the sockets), `shutdown()` from another thread, `server_close()`."""

    def __init__(self, host: str, port: int, sandbox: Any, token: str, *, workers: int, queue_size: int,
                 max_connections: int = MAX_CONNECTIONS, request_timeout_s: float = REQUEST_TIMEOUT_S,
                 send_timeout_s: float = SEND_TIMEOUT_S, max_tests: int = MAX_TESTS,
                 max_code_bytes: int = MAX_CODE_BYTES, max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        check_token(token)
        for name, v in (("workers", workers), ("max_connections", max_connections),
                        ("request_timeout_s", request_timeout_s), ("send_timeout_s", send_timeout_s),
                        ("max_tests", max_tests), ("max_code_bytes", max_code_bytes),
                        ("max_request_bytes", max_request_bytes)):
            if not v > 0:
                raise ValueError(f"sandbox server: {name} must be > 0, got {v}")
        if queue_size < 0:
            raise ValueError(f"sandbox server: queue_size must be >= 0, got {queue_size}")
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
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox-run")
        self._done: deque[tuple[int, bytes]] = deque()  # answers from the pool, for the loop to write
        self._conns: dict[int, _Conn] = {}  # in order of arrival
        self._ids = itertools.count()
        self._next_deadline = math.inf
        self._stopping = False
        self._closed = False
        self._idle = threading.Event()
        self._idle.set()
        self._loop_thread: Optional[threading.Thread] = None

    @property
    def connections(self) -> int:
        return len(self._conns)

    # ----------------------------------------------------------------------------------- socketserver-like

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        if self._closed:
            raise ValueError("sandbox server is closed")
        self._idle.clear()
        self._loop_thread = threading.current_thread()
        try:
            while not self._stopping:
                wait = min(poll_interval, max(0.0, self._next_deadline - time.monotonic()))
                for key, events in self._sel.select(wait):
                    self._dispatch(key.data, events)
                self._write_answers()
                self._expire(time.monotonic())
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
            try:
                sock, _addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors; the client retries
                log.warning("sandbox server: accept failed: %s", e)
                return
            if len(self._conns) >= self.max_connections and not self._evict():
                sock.close()
                continue
            sock.setblocking(False)
            now = time.monotonic()
            conn = _Conn(next(self._ids), sock, now)
            self._conns[conn.id] = conn
            self._set_deadline(conn, now + self.request_timeout_s)
            self._watch(conn, selectors.EVENT_READ)

    def _evict(self) -> bool:
        """Close the oldest connection that is still sending headers (or lingering), else the oldest still
        sending a body; False when all are busy with a run or its answer."""
        for states in (("head", "linger"), ("body",)):
            for conn in self._conns.values():  # oldest first
                if conn.state in states:
                    self._close(conn)
                    return True
        return False

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
        if not self._authorized(headers.get("authorization", [])):
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


def serve(host: str, port: int, cfg: SandboxConfig, *, token: Optional[str] = None, sandbox: Any = None,
          workers: Optional[int] = None, queue_size: Optional[int] = None, max_connections: int = MAX_CONNECTIONS,
          request_timeout_s: float = REQUEST_TIMEOUT_S, send_timeout_s: float = SEND_TIMEOUT_S,
          max_tests: int = MAX_TESTS, max_code_bytes: int = MAX_CODE_BYTES,
          max_request_bytes: int = MAX_REQUEST_BYTES) -> SandboxServer:
    """A server bound to (host, port); port 0 picks a free one (server.server_address has it). The token is
    `token`, else read from cfg.token_file or env PRORL_SANDBOX_TOKEN; without one: ValueError. Programs run
    in `sandbox` (default: a LocalSandbox(cfg)) on `workers` threads (default cfg.num_workers), with
    `queue_size` more waiting (default 4 x workers)."""
    if token is None:
        token = load_token(cfg.token_file, "--token-file")
    check_token(token)
    workers = workers or cfg.num_workers
    queue_size = 4 * workers if queue_size is None else queue_size
    return SandboxServer(host, port, LocalSandbox(cfg) if sandbox is None else sandbox, token,
                         workers=workers, queue_size=queue_size, max_connections=max_connections,
                         request_timeout_s=request_timeout_s, send_timeout_s=send_timeout_s, max_tests=max_tests,
                         max_code_bytes=max_code_bytes, max_request_bytes=max_request_bytes)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nemo_prorl.rewards.sandbox_remote", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--token-file", default="",
                    help=f"file holding the shared secret, mode 600 (else env {TOKEN_ENV}); required")
    ap.add_argument("--workers", type=int, default=SandboxConfig.num_workers, help="programs run at once")
    ap.add_argument("--queue-size", type=int, default=None,
                    help="requests waiting for a worker; more are answered 503 (default 4 x workers)")
    ap.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    ap.add_argument("--request-timeout-s", type=float, default=REQUEST_TIMEOUT_S,
                    help="for the whole request, headers and body")
    ap.add_argument("--send-timeout-s", type=float, default=SEND_TIMEOUT_S, help="for writing one answer")
    ap.add_argument("--max-tests", type=int, default=MAX_TESTS, help="inputs per request")
    ap.add_argument("--max-code-bytes", type=int, default=MAX_CODE_BYTES)
    ap.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES)
    ap.add_argument("--total-timeout-s", type=float, default=SandboxConfig.total_timeout_s)
    ap.add_argument("--memory-mb", type=int, default=SandboxConfig.memory_mb)
    ap.add_argument("--allow-unconfined", action="store_true",
                    help="run programs with rlimits only where this host cannot create namespaces (unsafe)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = SandboxConfig(num_workers=a.workers, total_timeout_s=a.total_timeout_s, memory_mb=a.memory_mb,
                        per_test_timeout_s=a.total_timeout_s, token_file=a.token_file,
                        allow_unconfined=a.allow_unconfined)
    try:
        server = serve(a.host, a.port, cfg, workers=a.workers, queue_size=a.queue_size,
                       max_connections=a.max_connections, request_timeout_s=a.request_timeout_s,
                       send_timeout_s=a.send_timeout_s, max_tests=a.max_tests, max_code_bytes=a.max_code_bytes,
                       max_request_bytes=a.max_request_bytes)
    except (ValueError, UnconfinedError) as e:
        ap.exit(2, f"sandbox server: refusing to start: {e}\n")
    print(f"nemo_prorl sandbox server on http://{a.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
