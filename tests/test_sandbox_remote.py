"""The remote sandbox server against hostile clients: no token, a wrong token, oversized requests, slow
and many connections, a full queue. Servers bind 127.0.0.1 only. No test asserts wall-clock figures: waits
only have generous hang guards, so a busy machine makes them slower, not red."""

import http.client
import json
import os
import secrets
import selectors
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from nemo_prorl.config.schema import SandboxConfig
from nemo_prorl.confine.sandbox import SandboxRun
from nemo_prorl.confine.sandbox import TestRun as _TestRun  # not a pytest class
from nemo_prorl.confine.remote import TOKEN_ENV, RemoteSandbox, serve

TOKEN = secrets.token_hex(16)
HANG_S = 60.0  # a guard against hanging forever, never a figure the test checks
ROOT = Path(__file__).resolve().parents[1]


class EchoSandbox:
    """Stands in for LocalSandbox where the server is under test, not the sandbox: each test prints its input."""

    namespaces = False

    def __init__(self) -> None:
        self.calls = 0

    def run(self, code, inputs):
        self.calls += 1
        return SandboxRun(tests=[_TestRun(status="ok", returncode=0, stdout=i) for i in inputs])


class GateSandbox(EchoSandbox):
    """Each run waits until `gate` is set (at most HANG_S); `started` counts runs begun."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)

    def run(self, code, inputs):
        self.started.release()
        self.gate.wait(HANG_S)
        return super().run(code, inputs)


@contextmanager
def running(sandbox=None, **kw):
    server = serve("127.0.0.1", 0, SandboxConfig(), token=TOKEN, sandbox=sandbox or EchoSandbox(), **kw)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        t.join(HANG_S)


def request(server, method="POST", path="/run", body=None, token=TOKEN, headers=None):
    """(status, JSON answer) of one request."""
    c = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=HANG_S)
    h = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    try:
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        c.close()


def wait_until(cond, what):
    end = time.monotonic() + HANG_S
    while not cond():
        assert time.monotonic() < end, f"hang guard: {what}"
        time.sleep(0.02)


def read_until_closed(sock) -> bytes:
    """What the server sends until it closes the connection (a reset counts as closed)."""
    sock.settimeout(HANG_S)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def token_file(tmp_path, mode=0o600, text=TOKEN) -> str:
    p = tmp_path / "sandbox.token"
    p.write_text(text + "\n")
    p.chmod(mode)
    return str(p)


GOOD = {"code": "print(input())", "inputs": ["1\n", "2\n"]}


# ----------------------------------------------------------------------------------------- authentication


def test_no_token_is_refused_with_401_and_nothing_runs():
    sb = EchoSandbox()
    with running(sb) as server:
        status, answer = request(server, body=GOOD, token=None)
        assert status == 401 and "token" in answer["error"]
        assert server.runs == 0 and sb.calls == 0
        assert request(server, body=GOOD)[0] == 200  # the right token works
        assert server.runs == 1 and sb.calls == 1


@pytest.mark.parametrize("auth", [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN.upper()}x",
                                  "Bearer ", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN} {TOKEN}"])
def test_wrong_token_is_refused_with_401(auth):
    sb = EchoSandbox()
    with running(sb) as server:
        status, _ = request(server, body=GOOD, token=None, headers={"Authorization": auth})
        assert status == 401
        assert server.runs == 0 and sb.calls == 0


def test_401_comes_before_the_body_is_read():
    """The server answers a request without the token from its headers alone: the 10 MB body it announces
    is never sent."""
    with running() as server:
        for auth in (b"", b"Authorization: Bearer wrong-token-wrong-token\r\n"):
            s = socket.create_connection(server.server_address, timeout=HANG_S)
            s.sendall(b"POST /run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth +
                      b"Content-Length: 10000000\r\n\r\n")
            got = read_until_closed(s)
            s.close()
            assert got.startswith(b"HTTP/1.1 401 "), got[:200]
        assert server.runs == 0


def test_health_needs_no_token_and_tells_only_ok_and_namespaces():
    with running() as server:
        status, answer = request(server, "GET", "/health", token=None)
        assert status == 200 and answer == {"ok": True, "namespaces": False}
        assert request(server, "GET", "/run", token=None)[0] == 401  # no probing other paths without it
        assert request(server, "GET", "/anything", token=None)[0] == 401


def test_server_refuses_to_start_without_a_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match=TOKEN_ENV):
        serve("127.0.0.1", 0, SandboxConfig(), sandbox=EchoSandbox())
    with pytest.raises(ValueError, match="at least 16"):
        serve("127.0.0.1", 0, SandboxConfig(), token="short", sandbox=EchoSandbox())
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the environment is the other place for it
    serve("127.0.0.1", 0, SandboxConfig(), sandbox=EchoSandbox()).server_close()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_token_file_open_to_group_or_others_is_refused_at_start(tmp_path, mode, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = token_file(tmp_path, mode)
    with pytest.raises(ValueError, match="group or others"):
        serve("127.0.0.1", 0, SandboxConfig(token_file=path), sandbox=EchoSandbox())


def _cli(*args, env_token=None):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if env_token:
        env[TOKEN_ENV] = env_token
    return subprocess.Popen([sys.executable, "-m", "nemo_prorl.confine.remote", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def test_cli_refuses_to_start_without_a_private_token_file(tmp_path):
    for args, says in [((), TOKEN_ENV), (("--token-file", token_file(tmp_path, 0o644)), "group or others"),
                       (("--token-file", str(tmp_path / "missing")), "cannot open")]:
        p = _cli(*args)
        try:
            out, err = p.communicate(timeout=120)
        finally:
            p.kill()
        assert p.returncode == 2 and "refusing to start" in err and says in err, (args, err[-2000:])
        assert "sandbox server on" not in out
        assert "RuntimeWarning" not in err, err  # runpy's: the package face must not import the command


def test_cli_serves_with_a_private_token_file(tmp_path):
    p = _cli("--token-file", token_file(tmp_path), "--workers", "1")
    guard = threading.Timer(120.0, p.kill)  # a hang guard for readline
    guard.start()
    try:
        line = p.stdout.readline()  # "nemo_prorl sandbox server on http://127.0.0.1:PORT"
        assert "sandbox server on http://127.0.0.1:" in line, p.stderr.read() if p.poll() is not None else line
        port = int(line.rsplit(":", 1)[1])

        class Addr:
            server_address = ("127.0.0.1", port)

        assert request(Addr, "GET", "/health", token=None)[0] == 200
        assert request(Addr, body=GOOD, token=None)[0] == 401
        assert request(Addr, body={"code": "x", "inputs": [1]})[0] == 400  # authenticated, checked, not run
    finally:
        guard.cancel()
        p.kill()
        p.communicate()


# ------------------------------------------------------------------------------------------------ limits


@pytest.mark.parametrize("body,limit", [
    ({"code": "print(1)", "inputs": ["\n"] * 600}, "max_tests=512"),
    ({"code": "#" * ((1 << 20) + 1), "inputs": ["\n"]}, "max_code_bytes"),
    ({"code": "print(1)", "inputs": ["1", 2]}, "inputs[1] must be a string"),
    ({"code": "print(1)", "inputs": [["1"]]}, "inputs[0] must be a string"),
    ({"code": "print(1)", "inputs": "1"}, "'inputs' must be a list"),
    ({"code": 1, "inputs": []}, "'code' must be a string"),
    (b"not json", "not JSON"),
    (b"[1]", "JSON object"),
])
def test_requests_over_a_limit_or_malformed_are_400_naming_it(body, limit):
    sb = EchoSandbox()
    with running(sb) as server:
        status, answer = request(server, body=body)
        assert status == 400 and limit in answer["error"], answer
        assert server.runs == 0 and sb.calls == 0


def test_request_bytes_and_headers_are_limited():
    with running(max_request_bytes=1000) as server:
        status, answer = request(server, body={"code": "x" * 2000, "inputs": []})
        assert status == 400 and "max_request_bytes" in answer["error"]
        s = socket.create_connection(server.server_address, timeout=HANG_S)  # endless headers
        s.sendall(b"POST /run HTTP/1.1\r\n" + b"X-a: " + b"a" * (70 << 10))
        assert b"max_header_bytes" in read_until_closed(s)
        s.close()
        assert request(server, body=GOOD, headers={"Transfer-Encoding": "chunked"})[0] == 400
        assert server.runs == 0


# ------------------------------------------------------------------------------------ slow and many clients


def test_slow_clients_do_not_pin_threads_and_a_real_request_is_still_served():
    """300 clients connect and send one byte each, then nothing. The server keeps to its own few threads
    (no thread per connection) and still answers a correct request from another client."""
    workers = 2
    clients = []
    before = threading.active_count()  # threads other tests of the session left (pools, Ray clients)
    with running(workers=workers, request_timeout_s=600.0, max_connections=256) as server:
        try:
            for _ in range(300):
                s = socket.create_connection(server.server_address, timeout=HANG_S)
                s.sendall(b"P")
                clients.append(s)
            wait_until(lambda: server.connections >= 256, "the server takes in the slow clients")
            assert threading.active_count() - before < workers + 5
            status, answer = request(server, body=GOOD)
            assert status == 200 and [t["stdout"] for t in answer["tests"]] == ["1\n", "2\n"]
            assert threading.active_count() - before < workers + 5
            assert server.connections <= 256
        finally:
            for s in clients:
                s.close()


def test_slowloris_is_dropped_at_the_request_deadline():
    """A client sending one byte a second never finishes its headers: the server closes the connection at
    the request deadline (1 s here), with a 408 when the socket takes it."""
    with running(request_timeout_s=1.0) as server:
        s = socket.create_connection(server.server_address, timeout=1.0)
        trickle = b"POST /run HTTP/1.1\r\nX-a: " + b"a" * 10_000
        got, closed, end = b"", False, time.monotonic() + HANG_S
        for byte in trickle:
            if time.monotonic() > end:
                break
            try:
                s.send(bytes([byte]))
                chunk = s.recv(4096)  # waits up to 1 s: the pace of the trickle
                got += chunk
                if not chunk:
                    closed = True
                    break
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
        s.close()
        assert closed, "the server kept a trickling connection open"
        assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got[:200]
        assert server.runs == 0


def test_connections_beyond_the_cap_push_out_the_oldest_idle_one():
    with running(max_connections=3, request_timeout_s=600.0) as server:
        idle = []
        for _ in range(3):
            s = socket.create_connection(server.server_address, timeout=HANG_S)
            s.sendall(b"P")
            idle.append(s)
        wait_until(lambda: server.connections == 3, "the server takes in three connections")
        extra = socket.create_connection(server.server_address, timeout=HANG_S)
        assert read_until_closed(idle[0]) == b""  # the oldest went
        wait_until(lambda: server.connections == 3, "the new one takes its place")
        assert request(server, body=GOOD)[0] == 200  # and a real client still gets in
        for s in (*idle, extra):
            s.close()


def test_full_queue_is_answered_503_at_once():
    sb = GateSandbox()
    with running(sb, workers=1, queue_size=1) as server:
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(request(server, body=GOOD)))
                   for _ in range(2)]
        try:
            threads[0].start()
            assert sb.started.acquire(timeout=HANG_S)  # the worker is busy with the first
            threads[1].start()
            wait_until(lambda: server.in_flight == 2, "the second request waits in the queue")
            status, answer = request(server, body=GOOD)  # the gate is still shut: only an at-once answer gets here
            assert status == 503 and "queue_size" in answer["error"]
            assert server.runs == 1  # the second waits, the third was never taken
        finally:
            sb.gate.set()
            for t in threads:
                t.join(HANG_S)
        assert sorted(s for s, _ in answers) == [200, 200]
        assert server.runs == 2


# ------------------------------------------------------------------------------------------------ client


def test_remote_sandbox_needs_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    url = "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="reward.sandbox.token_file"):
        RemoteSandbox(SandboxConfig(backend="remote", url=url))
    with pytest.raises(ValueError, match="reward.sandbox.token_file.*group or others"):
        RemoteSandbox(SandboxConfig(backend="remote", url=url, token_file=token_file(tmp_path, 0o644)))
    RemoteSandbox(SandboxConfig(backend="remote", url=url, token_file=token_file(tmp_path)))
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    RemoteSandbox(SandboxConfig(backend="remote", url=url))


def test_remote_sandbox_sends_the_token_and_reports_refusals(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with running() as server:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        ok = RemoteSandbox(SandboxConfig(backend="remote", url=url, token_file=token_file(tmp_path)))
        run = ok.run("print(input())", ["a\n"])
        assert run.error == "" and run.tests[0].stdout == "a\n"
        monkeypatch.setenv(TOKEN_ENV, "another-token-another-token")
        run = RemoteSandbox(SandboxConfig(backend="remote", url=url)).run("print(input())", ["a\n"])
        assert "HTTP 401" in run.error and run.tests == []
        assert server.runs == 1


def test_remote_sandbox_end_to_end_with_a_local_sandbox(tmp_path, monkeypatch):
    """The documented protocol against the real LocalSandbox (slow to start on a busy machine: generous
    limits), and a dead server gives an error, not an exception."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = token_file(tmp_path)
    limits = dict(total_timeout_s=120.0, per_test_timeout_s=60.0, cpu_time_s=60, allow_unconfined=True)
    server = serve("127.0.0.1", 0, SandboxConfig(token_file=path, num_workers=1, **limits))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        client = RemoteSandbox(SandboxConfig(backend="remote", url=url, token_file=path, **limits))
        run = client.run("print(input())", ["hello\n", "world\n"])
        assert run.error == "", run
        assert [(r.status, r.stdout) for r in run.tests] == [("ok", "hello\n"), ("ok", "world\n")]
        # function tests: the server's own harness calls the function; the value comes back as a literal
        req = json.dumps({"kind": "call", "fn": "add", "args": "[2, 3]"})
        run = client.run("def add(a, b):\n    return (a + b, 'x')\n", [req], driver=True)
        assert run.error == "" and run.tests[0].result == "(5, 'x')", run
    finally:
        server.shutdown()
        server.server_close()
        t.join(HANG_S)
    run = client.run("print(input())", ["hello\n"])
    assert "sandbox server" in run.error and run.tests == []


# ------------------------------------------------------------------------- a slowloris flood against honest clients


def _slowloris_flood(server, n, stop, dropped, first=b"POST /run HTTP/1.1\r\nX-a: "):
    """`n` connections that never authenticate: each sends `first`, then dribbles header bytes; one the server
    closes is replaced at once by a new one (the flood goes on until `stop`). `dropped` gets one entry per close."""
    sel = selectors.DefaultSelector()

    def open_one():
        s = socket.create_connection(server.server_address, timeout=HANG_S)  # a full server: waits in the backlog
        s.setblocking(False)
        s.send(first)
        sel.register(s, selectors.EVENT_READ)

    for _ in range(n):
        open_one()
    try:
        while not stop.is_set():
            for key, _ in sel.select(0.02):
                try:
                    data = key.fileobj.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:  # closed by the server (a 408 before it would come as data first)
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    dropped.append(1)
                    open_one()
            for key in list(sel.get_map().values()):
                try:
                    key.fileobj.send(b"a")
                except OSError:
                    pass
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()


def _slow_honest_request(server, pace_s, chunk=8):
    """A client with the token that sends its request `chunk` bytes at a time, one chunk every `pace_s`, with
    its headers in the order RemoteSandbox (urllib) sends them. Returns what the server answered, or the error
    that ended the connection."""
    body = json.dumps(GOOD).encode()
    data = (f"POST /run HTTP/1.1\r\nAccept-Encoding: identity\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\n\r\n").encode() + body
    try:
        with socket.create_connection(server.server_address, timeout=HANG_S) as s:
            for i in range(0, len(data), chunk):
                s.sendall(data[i:i + chunk])
                time.sleep(pace_s)
            return read_until_closed(s)
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def test_a_slowloris_flood_does_not_push_out_slow_honest_clients():
    """40 connections dribble header bytes and reconnect as soon as they are dropped; 10 clients with the token
    send their requests 8 bytes every 10 ms meanwhile. Every honest client is served; the dropped connections
    are the flood's. (The grace a connection has to show its token is generous, 5 s, and no figure is checked.)"""
    stop, dropped, answers = threading.Event(), [], []
    with running(max_connections=16, request_timeout_s=600.0, auth_grace_s=5.0) as server:
        flood = threading.Thread(target=_slowloris_flood, args=(server, 40, stop, dropped), daemon=True)
        flood.start()
        try:
            wait_until(lambda: server.connections >= 16, "the flood fills the server")
            honest = [threading.Thread(target=lambda: answers.append(_slow_honest_request(server, 0.01)))
                      for _ in range(10)]
            for t in honest:
                t.start()
            for t in honest:
                t.join(4 * HANG_S)
        finally:
            stop.set()
            flood.join(HANG_S)
        bad = [a for a in answers if not (isinstance(a, bytes) and a.startswith(b"HTTP/1.1 200 "))]
        assert len(answers) == 10 and not bad, f"{len(bad)} of 10 honest clients not served: {bad[:3]}"
        assert server.runs == 10
        assert dropped, "the flood's connections were never pushed out"


# A request line and 4 header lines, none of them the token: the most an honest client may send before it
# (RemoteSandbox sends it as its first or second header line), then an unfinished fifth line.
TOKENLESS_HEAD = b"POST /run HTTP/1.1\r\nHost: x\r\nX-a: 1\r\nX-b: 2\r\nX-c: 3\r\nX-d: "


def test_a_flood_of_tokenless_headers_is_pushed_out_at_once_not_after_the_grace():
    """40 connections send a request line and 4 header lines without the token at once, then dribble, and
    reconnect when dropped; 5 fast and 5 slow clients with the token come meanwhile. The grace is an hour,
    longer than every hang guard here: the honest clients are served only if the flood's connections are
    pushed out as soon as their first header lines show no token (before, they held their places for the
    whole grace and the honest clients waited in the listen backlog behind them)."""
    stop, dropped, answers = threading.Event(), [], []
    with running(max_connections=16, request_timeout_s=3600.0, auth_grace_s=3600.0) as server:
        flood = threading.Thread(target=_slowloris_flood, args=(server, 40, stop, dropped, TOKENLESS_HEAD),
                                 daemon=True)
        flood.start()
        try:
            wait_until(lambda: server.connections >= 16, "the flood fills the server")
            fast = [threading.Thread(target=lambda: answers.append(_fast_honest_request(server))) for _ in range(5)]
            slow = [threading.Thread(target=lambda: answers.append(_slow_honest_request(server, 0.01)))
                    for _ in range(5)]
            for t in (*fast, *slow):
                t.start()
            for t in (*fast, *slow):
                t.join(4 * HANG_S)
        finally:
            stop.set()
            flood.join(HANG_S)
        bad = [a for a in answers if not (isinstance(a, bytes) and a.startswith(b"HTTP/1.1 200 "))]
        assert len(answers) == 10 and not bad, f"{len(bad)} of 10 honest clients not served: {bad[:3]}"
        assert server.runs == 10
        assert dropped, "the flood's connections were never pushed out"


def _fast_honest_request(server):
    """A request with the token in one go (http.client), as bytes like _slow_honest_request's, or the error."""
    try:
        status, answer = request(server, body=GOOD)
        return f"HTTP/1.1 {status} ".encode() + json.dumps(answer).encode()
    except OSError as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("head", [TOKENLESS_HEAD, b"POST /run HTTP/1.1\r\nAuthorization: Bearer " + b"w" * 32 + b"\r\nX: ",
                                  b"POST /run HTTP/1.1\r\nX-a: " + b"a" * (9 << 10)],
                         ids=["4-header-lines", "wrong-token-line", "9KiB-line"])
def test_at_the_cap_a_tokenless_head_goes_first_with_a_401_and_a_silent_one_keeps_its_grace(head):
    """On a full server (2 places, an hour's grace) a newcomer pushes out the connection whose request line and
    4 header lines (or a wrong Authorization line, or over 8 KiB of head) came without the token, answering it
    401, not the older one that has sent nothing yet (it may be an honest client on a slow link: it keeps its
    grace)."""
    with running(max_connections=2, request_timeout_s=3600.0, auth_grace_s=3600.0) as server:
        silent = socket.create_connection(server.server_address, timeout=HANG_S)
        wait_until(lambda: server.connections == 1, "the silent one is in")
        tokenless = socket.create_connection(server.server_address, timeout=HANG_S)
        tokenless.sendall(head)  # the newcomer may come before or after the server has read it
        newcomer = socket.create_connection(server.server_address, timeout=HANG_S)
        got = read_until_closed(tokenless)
        assert got == b"" or (got.startswith(b"HTTP/1.1 401 ") and b"first 4 header lines" in got), got[:300]
        wait_until(lambda: server.connections == 2, "the newcomer takes its place")
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):  # still open, nothing sent to it
            silent.recv(1)
        for s in (silent, tokenless, newcomer):
            s.close()


def test_an_authenticated_connection_is_never_pushed_out_by_a_new_one():
    """Two clients have sent their token (one still sending headers, one its body) on a server with room for
    two; a third connection waits in the listen backlog instead of pushing either out, even with no grace."""
    body = json.dumps(GOOD).encode()
    head = f"POST /run HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
    rest = f"Content-Length: {len(body)}\r\n\r\n".encode()
    with running(max_connections=2, request_timeout_s=600.0, auth_grace_s=0.0) as server:
        a = socket.create_connection(server.server_address, timeout=HANG_S)
        b = socket.create_connection(server.server_address, timeout=HANG_S)
        a.sendall(head)  # in its headers, token shown
        b.sendall(head + rest + body[:5])  # in its body
        wait_until(lambda: server.authenticated == 2, "both clients are authenticated")
        stranger = socket.create_connection(server.server_address, timeout=HANG_S)
        stranger.sendall(b"POST /run HTTP/1.1\r\n")
        a.sendall(rest + body)
        b.sendall(body[5:])
        for s in (a, b):
            got = read_until_closed(s)
            assert got.startswith(b"HTTP/1.1 200 "), got[:200]
            s.close()
        assert server.runs == 2
        stranger.close()


def test_remote_sandbox_shows_its_token_early_in_its_headers(monkeypatch):
    """The early check of the token protects a client from the moment its Authorization line is in: the client
    sends it right after the request line (and never on a redirect)."""
    got = []
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        def serve_once():
            c, _ = lsock.accept()
            with c:
                c.settimeout(HANG_S)
                got.append(c.recv(65536))
                c.sendall(b"HTTP/1.1 500 x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        t = threading.Thread(target=serve_once, daemon=True)
        t.start()
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        url = f"http://127.0.0.1:{lsock.getsockname()[1]}"
        run = RemoteSandbox(SandboxConfig(backend="remote", url=url)).run("print(1)", [""])
        t.join(HANG_S)
        assert "HTTP 500" in run.error
    lines = got[0].split(b"\r\n")
    assert lines[0] == b"POST /run HTTP/1.1"
    assert any(x == f"Authorization: Bearer {TOKEN}".encode() for x in lines[1:3]), lines[:4]
