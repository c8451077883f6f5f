"""A small HTTP proxy on 127.0.0.1 that injects faults (and latency) between s3fs and moto's server.

    with FaultProxy(moto_endpoint, fault_rate=0.15, max_faults=200, seed=0) as proxy:
        monkeypatch.setenv("DUMO_S3_ENDPOINT_URL", proxy.url)
        ...                                    # real s3fs/botocore requests, through the proxy
        proxy.counts                           # {"503": n, "500": n, "drop_before": n, "drop_after": n}

Faults, each drawn per request from a seeded generator with probability ``fault_rate``:
- ``503``: S3's ``SlowDown`` error document, status 503, the request not forwarded;
- ``500``: S3's ``InternalError``, status 500, not forwarded;
- ``drop_before``: the connection closed without an answer, the request not forwarded;
- ``drop_after``: the request forwarded (so S3 applied it), then the connection closed without an answer.
``fail_next(kind, match)`` injects a fault into the next request(s) that ``match(method, path, headers)``
accepts, whatever the rate: the ambiguous PUT of a lock, for example. ``latency_s`` delays every request
(a distant object store). Bounded: at most ``max_faults`` faults in all, and the proxy stops by itself after
``lifetime_s``, so a test that hangs cannot leave it running. Requests to moto's own API (``/moto-api``)
are never faulted.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULT_KINDS = ("503", "500", "drop_before", "drop_after")
_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
Matcher = Callable[[str, str, dict[str, str]], bool]


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        fault_rate: float = 0.0,
        kinds: tuple[str, ...] = FAULT_KINDS,
        max_faults: int | None = None,
        latency_s: float = 0.0,
        seed: int = 0,
        lifetime_s: float = 600.0,
    ):
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.fault_rate, self.kinds, self.max_faults = fault_rate, tuple(kinds), max_faults
        self.latency_s, self.lifetime_s = latency_s, lifetime_s
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self.log: list[tuple[str, str, str]] = []  # (method, path, fault or "") per request
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._targeted: list[tuple[str, Matcher]] = []
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # -- control ------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def faults(self) -> int:
        return sum(self.counts.values())

    def fail_next(self, kind: str, match: Matcher, times: int = 1) -> None:
        """Inject ``kind`` into the next ``times`` requests that ``match`` accepts."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {FAULT_KINDS}")
        with self._lock:
            self._targeted += [(kind, match)] * times

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)  # stops by itself
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- per request --------------------------------------------------------------------------------------
    def _choose(self, method: str, path: str, headers: dict[str, str]) -> str | None:
        with self._lock:
            self.requests += 1
            fault = None
            for i, (kind, match) in enumerate(self._targeted):
                if match(method, path, headers):
                    fault = kind
                    del self._targeted[i]
                    break
            if fault is None and not path.startswith("/moto-api") and self.fault_rate > 0:
                bounded = self.max_faults is not None and self.faults >= self.max_faults
                if not bounded and self._rng.random() < self.fault_rate:
                    fault = self._rng.choice(self.kinds)
            if fault is not None:
                self.counts[fault] += 1
            self.log.append((method, path, fault or ""))
            return fault


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for botocore's large PUTs

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        owner = self.owner
        body = self._body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        fault = owner._choose(self.command, self.path, headers)
        if owner.latency_s:
            time.sleep(owner.latency_s)
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            data = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if fault == "drop_before":
            self.close_connection = True
            return
        conn = http.client.HTTPConnection(*owner.upstream, timeout=60)
        try:
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if fault == "drop_after":  # S3 applied it; the client never hears
            self.close_connection = True
            return
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
