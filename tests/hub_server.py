"""A stand-in for huggingface.co on 127.0.0.1, for the upload tests (this machine has no network).

It answers the requests huggingface_hub itself sends for `whoami`, `create_repo` and `upload_folder` (every
file uploaded inline, as small files are), and keeps what was committed, so a test can compare a repository
with the folder it came from. `uploads_fail` makes the upload step answer 503 (with `Retry-After`), as the hub
does in an outage.
Tokens: `hf_write` (user `tester`, member of `team`), `hf_read` (read-only); any other is refused (401).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USER, ORG = "tester", "team"
ROLES = {"hf_write": "write", "hf_read": "read"}


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict[str, bytes]] = {}
        self.uploads_fail = False
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _role(self) -> str | None:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        return ROLES.get(token)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.requests.append(f"GET {self.path}")
        if self.path.startswith("/api/whoami-v2"):
            role = self._role()
            if role is None:
                return self._send(401, {"error": "Invalid credentials in Authorization header"})
            return self._send(
                200, {"type": "user", "name": USER, "orgs": [{"name": ORG}], "auth": {"accessToken": {"role": role}}}
            )
        self._send(404, {"error": f"not served here: {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        self.server.requests.append(f"POST {self.path}")
        body = self._body()
        if self.path.startswith("/api/validate-yaml"):  # a README.md's metadata, checked before the commit
            return self._send(200, {"errors": [], "warnings": []})
        if self._role() != "write":
            return self._send(401 if self._role() is None else 403, {"error": "no write access"})
        if self.path.startswith("/api/repos/create"):
            info = json.loads(body)
            repo = f"{info.get('organization') or USER}/{info['name']}"
            self.server.repos.setdefault(repo, {})
            return self._send(200, {"url": f"{self.server.url}/{repo}", "name": repo, "id": repo})
        match = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/", self.path)
        if match is None:
            return self._send(404, {"error": f"not served here: {self.path}"})
        repo, step = match.groups()
        if step == "preupload":
            if self.server.uploads_fail:
                # An outage's answer with the retry delay the hub sends: huggingface_hub's retries then wait
                # about a second each instead of its 1-8 s backoff, and still all fail.
                return self._send(503, {"error": "Service Unavailable"}, {"Retry-After": "0"})
            files = json.loads(body)["files"]
            return self._send(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        stored = self.server.repos.setdefault(repo, {})
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                stored[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        self._send(
            200, {"commitUrl": f"{self.server.url}/{repo}/commit/1", "commitOid": "1" * 40, "pullRequestUrl": None}
        )
