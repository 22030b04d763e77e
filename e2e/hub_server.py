"""A local HTTP server speaking the part of the Hugging Face hub's file API that
downloads use (point HF_ENDPOINT at it): the revision listing
`/api/models/<repo>/revision/<rev>` and `HEAD|GET /<repo>/resolve/<rev>/<file>`
with the commit and ETag headers, Range requests, and bearer-token checks. It
records every request, and can cut a file's first download short to exercise
resuming."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
LISTING = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/?]+)")


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class HubServer:
    repo: str
    directory: Path
    token: str
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    requests: list[Request] = field(default_factory=list)
    cut_short: set[str] = field(default_factory=set)  # files whose first GET stops half way

    def __enter__(self) -> Self:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

            def log_message(self, *_) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.directory)) for p in self.directory.rglob("*") if p.is_file())

    def downloads(self) -> list[str]:
        """Files fetched with GET (content, not metadata), in order."""
        matches = (RESOLVE.match(r.path) for r in self.requests if r.method == "GET")
        return [m["file"] for m in matches if m]

    def _serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append(Request(handler.command, handler.path, handler.headers.get("Range")))
        if handler.headers.get("Authorization") != f"Bearer {self.token}":
            return _reply(handler, 401, {"error": "Invalid credentials in Authorization header"}, body)
        listing, resolve = LISTING.match(handler.path), RESOLVE.match(handler.path)
        match = listing or resolve
        if match is None or match["repo"] != self.repo:
            return _reply(handler, 404, {"error": "Repository not found"}, body, {"X-Error-Code": "RepoNotFound"})
        if match["rev"] not in ("main", self.commit):
            return _reply(handler, 404, {"error": "Invalid rev id"}, body, {"X-Error-Code": "RevisionNotFound"})
        if resolve is None:
            return _reply(handler, 200, {"id": self.repo, "sha": self.commit,
                                         "siblings": [{"rfilename": f} for f in self.files()]}, body)
        path = self.directory / resolve["file"]
        if not path.is_file():
            return _reply(handler, 404, {"error": "Entry not found"}, body,
                          {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commit})
        self._send_file(handler, path, resolve["file"], body)

    def _send_file(self, handler: BaseHTTPRequestHandler, path: Path, name: str, body: bool) -> None:
        data = path.read_bytes()
        asked = re.match(r"bytes=(\d+)-", handler.headers.get("Range", "bytes=0-"))
        start = int(asked[1]) if asked else 0
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", self.commit)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(data) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if not body:
            return
        if name in self.cut_short:
            self.cut_short.discard(name)
            handler.wfile.write(data[start:start + (len(data) - start) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)  # the connection drops mid-file
            return
        handler.wfile.write(data[start:])


def _reply(handler: BaseHTTPRequestHandler, code: int, payload: dict, body: bool, headers: dict | None = None) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    if body:
        handler.wfile.write(data)
