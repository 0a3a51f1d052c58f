"""The remote sandbox, for clusters: the client (`RemoteSandbox`: reward.sandbox.backend=remote,
reward.sandbox.url=http://host:port, reward.sandbox.token_file=PATH) and the command that starts its server:

    umask 077; python -c 'import secrets; print(secrets.token_hex(32))' > /etc/prorl-sandbox.token
    python -m nemo_prorl.confine.remote --host 0.0.0.0 --port 8080 --token-file /etc/prorl-sandbox.token \
        [--workers 16] [--queue-size 64] [--max-connections 256] [--request-timeout-s 10] [--auth-grace-s 2] \
        [--max-tests 512]

It runs each request in a `LocalSandbox` with the limits it was started with (a client cannot loosen them).

Authentication: a shared secret (at least 16 printable ASCII characters, no spaces), from --token-file (a
file that group and others can neither read nor write; the server refuses to start otherwise) or else
env PRORL_SANDBOX_TOKEN. Without one the server does not start. Clients (`RemoteSandbox`) read the same
secret from reward.sandbox.token_file or env PRORL_SANDBOX_TOKEN and send `Authorization: Bearer <token>`;
a request without the right token is answered 401 as soon as its headers are in, before its body is read.

Protocol (JSON over HTTP/1.1, one request per connection; the server closes it after the answer):
    POST /run   {"code": "<python source>", "inputs": ["<stdin of test 0>", ...], "driver": false}
                (with "driver": true each input is a request for the function-test harness,
                 driver.py, and "result" carries what it wrote)
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

Serving (one selector thread, connection caps, flood handling): server.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence

from nemo_prorl.config.schema import SandboxConfig
from nemo_prorl.confine.sandbox import LocalSandbox, SandboxRun, UnconfinedError
from nemo_prorl.confine.server import (AUTH_GRACE_S, MAX_CODE_BYTES, MAX_CONNECTIONS, MAX_REQUEST_BYTES,
                                               MAX_TESTS, REQUEST_TIMEOUT_S, SEND_TIMEOUT_S, SandboxServer,
                                               check_token)

log = logging.getLogger(__name__)

TOKEN_ENV = "PRORL_SANDBOX_TOKEN"


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
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        # Unredirected headers go first: the token is then the second header line, so the server protects
        # this connection from a flood as soon as that line is in (and a redirect would not carry it).
        req.add_unredirected_header("Authorization", self._auth)
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                return SandboxRun.from_json(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            return SandboxRun(error=f"sandbox server {self.url}: HTTP {e.code}: {e.read()[:300]!r}")
        except (urllib.error.URLError, OSError, ValueError, TypeError, KeyError) as e:  # incl. a bad reply
            return SandboxRun(error=f"sandbox server {self.url}: {type(e).__name__}: {e}")


def serve(host: str, port: int, cfg: SandboxConfig, *, token: Optional[str] = None, sandbox: Any = None,
          workers: Optional[int] = None, queue_size: Optional[int] = None, max_connections: int = MAX_CONNECTIONS,
          request_timeout_s: float = REQUEST_TIMEOUT_S, send_timeout_s: float = SEND_TIMEOUT_S,
          max_tests: int = MAX_TESTS, max_code_bytes: int = MAX_CODE_BYTES,
          max_request_bytes: int = MAX_REQUEST_BYTES, auth_grace_s: float = AUTH_GRACE_S) -> SandboxServer:
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
                         max_code_bytes=max_code_bytes, max_request_bytes=max_request_bytes,
                         auth_grace_s=auth_grace_s)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nemo_prorl.confine.remote", description=__doc__,
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
    ap.add_argument("--auth-grace-s", type=float, default=AUTH_GRACE_S,
                    help="at the cap, how long a new connection keeps its place before showing the token")
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
                       max_request_bytes=a.max_request_bytes, auth_grace_s=a.auth_grace_s)
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
