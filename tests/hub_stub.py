"""A local stand-in for the Hugging Face Hub's upload endpoints, on 127.0.0.1, for the push tests.

It answers what huggingface_hub's create_repo and create_commit call (repos/create, validate-yaml,
preupload, commit), asks for every file inline ("regular" upload mode, so no LFS or Xet transfer), and
records each request's headers and the files of each commit, decoded from its NDJSON body.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "hf_stubtoken0123456789"


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes]
    headers: dict[str, str]


@dataclass
class HubStub:
    url: str = ""
    created: list[dict] = field(default_factory=list)  # repos/create payloads
    commits: list[Commit] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # method, path, headers


def _handler(stub: HubStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            headers = {k.lower(): v for k, v in self.headers.items()}
            body = self.rfile.read(int(headers.get("content-length", 0)))
            path = self.path.split("?")[0]
            stub.requests.append(("POST", path, headers))
            if headers.get("authorization") != f"Bearer {TOKEN}":
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            if path == "/api/repos/create":
                payload = json.loads(body)
                stub.created.append(payload)
                repo_id = f"{payload['organization']}/{payload['name']}"
                return self._reply(200, {"url": f"{stub.url}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                return self._reply(200, {})
            parts = path.strip("/").split("/")  # api models ORG NAME (preupload|commit) REVISION
            if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                    "shouldIgnore": False, "oid": None} for f in files]})
            if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(item["value"] for item in lines if item["key"] == "header")
                files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                         for item in lines if item["key"] == "file"}
                assert all(item["value"]["encoding"] == "base64" for item in lines if item["key"] == "file")
                stub.commits.append(Commit(f"{parts[2]}/{parts[3]}", parts[5], header["summary"], files,
                                           headers))
                return self._reply(200, {"commitUrl": f"{stub.url}/{parts[2]}/{parts[3]}/commit/abc123",
                                         "commitOid": "abc123", "pullRequestUrl": None})
            return self._reply(404, {"error": f"the stub has no {path}"})

    return Handler


class running_stub:
    """`with running_stub() as stub:` a HubStub serving on a free port of 127.0.0.1."""

    def __enter__(self) -> HubStub:
        self.stub = HubStub()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.stub))
        self.stub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.stub

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
