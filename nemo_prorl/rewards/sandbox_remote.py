"""A sandbox on another host, for clusters whose GPU nodes must not run untrusted code (reward.sandbox.
backend=remote, reward.sandbox.url=http://host:port). The server is this module:

    python -m nemo_prorl.rewards.sandbox_remote --host 0.0.0.0 --port 8080 [--workers 16]

It runs each request in a `LocalSandbox` with the limits it was started with (a client cannot loosen them).

Protocol (JSON over HTTP/1.1):
    POST /run   {"code": "<python source>", "inputs": ["<stdin of test 0>", ...]}
      200 ->    {"tests": [{"status": "ok"|"runtime_error"|"timeout"|"killed"|"output_limit"|"file_size_limit",
                            "returncode": int|null, "stdout": str, "stderr": str, "wall_s": float}, ...],
                 "error": "", "wall_s": float, "notes": [str, ...]}
      400 ->    {"error": "<what is wrong with the request>"}
    GET /health -> {"ok": true, "namespaces": bool}
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import BoundedSemaphore
from typing import Sequence

from nemo_prorl.config.schema import SandboxConfig
from nemo_prorl.rewards.sandbox import SANDBOXES, LocalSandbox, SandboxRun

MAX_REQUEST_BYTES = 64 << 20


class RemoteSandbox:
    def __init__(self, cfg: SandboxConfig) -> None:
        if not cfg.url:
            raise ValueError("reward.sandbox.url must be set when reward.sandbox.backend=remote")
        self.url = cfg.url.rstrip("/") + "/run"
        self.timeout = cfg.total_timeout_s + 30.0  # server-side queueing plus the run itself

    def run(self, code: str, inputs: Sequence[str]) -> SandboxRun:
        body = json.dumps({"code": code, "inputs": list(inputs)}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return SandboxRun.from_json(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            return SandboxRun(error=f"sandbox server {self.url}: HTTP {e.code}: {e.read()[:300]!r}")
        except (urllib.error.URLError, OSError, ValueError, TypeError, KeyError) as e:  # incl. a bad reply
            return SandboxRun(error=f"sandbox server {self.url}: {type(e).__name__}: {e}")


SANDBOXES.register("remote")(RemoteSandbox)


def make_handler(sandbox: LocalSandbox, workers: int) -> type[BaseHTTPRequestHandler]:
    slots = BoundedSemaphore(workers)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802  (http.server naming)
            if self.path == "/health":
                self._send(200, {"ok": True, "namespaces": sandbox.namespaces})
            else:
                self._send(404, {"error": f"unknown path {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/run":
                return self._send(404, {"error": f"unknown path {self.path}"})
            n = int(self.headers.get("Content-Length") or 0)
            if not 0 < n <= MAX_REQUEST_BYTES:
                return self._send(400, {"error": f"Content-Length must be in 1..{MAX_REQUEST_BYTES}"})
            try:
                req = json.loads(self.rfile.read(n))
                code, inputs = req["code"], req["inputs"]
                if not isinstance(code, str) or not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
                    raise TypeError("'code' must be a string and 'inputs' a list of strings")
            except (ValueError, KeyError, TypeError) as e:
                return self._send(400, {"error": f"bad request: {type(e).__name__}: {e}"})
            with slots:
                run = sandbox.run(code, inputs)
            self._send(200, asdict(run))

        def log_message(self, fmt: str, *args) -> None:  # keep request lines out of the trainer's log
            pass

    return Handler


def serve(host: str, port: int, cfg: SandboxConfig) -> ThreadingHTTPServer:
    """A server bound to (host, port); port 0 picks a free one (server.server_address has it)."""
    return ThreadingHTTPServer((host, port), make_handler(LocalSandbox(cfg), cfg.num_workers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--workers", type=int, default=SandboxConfig.num_workers)
    ap.add_argument("--total-timeout-s", type=float, default=SandboxConfig.total_timeout_s)
    ap.add_argument("--memory-mb", type=int, default=SandboxConfig.memory_mb)
    a = ap.parse_args()
    cfg = SandboxConfig(num_workers=a.workers, total_timeout_s=a.total_timeout_s, memory_mb=a.memory_mb,
                        per_test_timeout_s=a.total_timeout_s)
    server = serve(a.host, a.port, cfg)
    print(f"nemo_prorl sandbox server on http://{a.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
