"""A real local HTTP file server for the hub tests: Range support, per-path faults, a request log."""
from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import pytest

CHUNK = 16 * 1024


@dataclass
class Request:
    """One request as the server saw it."""

    path: str
    range: Optional[str]
    status: int = 0
    sent: int = 0  # body bytes written


@dataclass
class _Entry:
    data: bytes
    faults: list = field(default_factory=list)  # consumed one per request
    always: dict = field(default_factory=dict)  # applied to every request


def make_blob(size: int, seed: int = 0, stem: str = "model_final") -> tuple[bytes, str]:
    """Random bytes and a Detectron2-style file name carrying their md5 prefix."""
    data = random_bytes(size, seed)
    return data, f"{stem}_{hashlib.md5(data).hexdigest()[:6]}.pkl"


def random_bytes(size: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    import random

    return random.Random(seed).randbytes(size)


class FileServer:
    """Serves registered paths over HTTP on 127.0.0.1; faults are dicts, see _Handler.do_GET."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fileserver = self  # type: ignore[attr-defined]
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def add(self, path: str, data: bytes, faults: tuple = (), always: Optional[dict] = None) -> str:
        """Serve `data` at `path`; returns its full URL."""
        with self._lock:
            self.entries[path] = _Entry(data, list(faults), dict(always or {}))
        return self.base + path

    def requests(self, path: Optional[str] = None) -> list[Request]:
        """Requests seen so far, optionally for one path."""
        with self._lock:
            return [r for r in self.log if path is None or r.path == path]

    def bytes_sent(self, path: str) -> int:
        """Body bytes sent for `path` over all requests."""
        return sum(r.sent for r in self.requests(path))

    def _next(self, path: str) -> tuple[Optional[_Entry], dict]:
        with self._lock:
            e = self.entries.get(path)
            if e is None:
                return None, {}
            fault = e.faults.pop(0) if e.faults else {}
            return e, {**e.always, **fault}

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        """Faults: status (reply with it), ignore_range, drop_after (body bytes, then cut the
        connection), rate (bytes/s), stall (seconds of silence after stall_after body bytes),
        chunked (Transfer-Encoding: chunked, no Content-Length)."""
        srv: FileServer = self.server.fileserver  # type: ignore[attr-defined]
        req = Request(self.path, self.headers.get("Range"))
        with srv._lock:
            srv.log.append(req)
        entry, fault = srv._next(self.path)
        self.close_connection = True
        if entry is None or "status" in fault:
            req.status = 404 if entry is None else fault["status"]
            self._reply_empty(req.status)
            return
        data = entry.data
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", req.range or "")
        if m and not fault.get("ignore_range"):
            start = int(m.group(1))
            if start >= len(data):
                req.status = 416
                self._reply_empty(416, {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
        req.status = status
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        chunked = fault.get("chunked", False)
        if chunked:  # no length known up front
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Connection", "close")
        self.end_headers()
        limit = fault.get("drop_after", len(body))
        rate = fault.get("rate")
        stalled = False
        try:
            pos = 0
            while pos < min(limit, len(body)):
                if "stall" in fault and not stalled and pos >= fault.get("stall_after", 0):
                    self.wfile.flush()
                    time.sleep(fault["stall"])
                    stalled = True
                piece = body[pos : min(pos + CHUNK, limit)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                pos += len(piece)
                req.sent = pos
                if rate:
                    self.wfile.flush()
                    time.sleep(len(piece) / rate)
            if limit < len(body):  # cut the connection mid-body
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _reply_empty(self, status: int, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()


@pytest.fixture
def server():
    """A running FileServer, closed after the test."""
    srv = FileServer()
    yield srv
    srv.close()


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A fresh cache in tmp_path, fast retries, and none of the user's ZOO_* settings; returns the cache root."""
    for var in ("ZOO_MIRROR", "ZOO_OFFLINE", "ZOO_TIMEOUT", "ZOO_RETRIES", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "cache"
    monkeypatch.setenv("ZOO_HOME", str(root))
    monkeypatch.setenv("ZOO_RETRY_BASE_DELAY", "0.01")
    monkeypatch.setenv("ZOO_QUIET", "1")
    return root


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
