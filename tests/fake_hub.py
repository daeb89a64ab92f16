"""A local stand-in for the Hugging Face Hub's HTTP API, enough for huggingface_hub's
create_repo + upload_folder of small files ("regular" uploads: the content travels base64 in the
commit). Started in a thread; point HF_ENDPOINT at `url`. `deny=True` answers 401 to everything."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


class FakeHub:
    def __init__(self, deny: bool = False):
        self.deny = deny
        self.repos: dict[str, dict] = {}     # repo id -> create request
        self.files: dict[str, dict[str, bytes]] = {}
        self.revisions: dict[str, dict[str, set[str]]] = {}  # repo id -> revision -> paths committed there
        self.branches: dict[str, set[str]] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.send(401 if hub.deny else 404, {"error": "not found"})

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if hub.deny:
                    return self.send(401, {"error": "Invalid credentials in Authorization header"})
                if self.path == "/api/repos/create":
                    req = json.loads(data)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    hub.repos[repo] = req
                    return self.send(200, {"url": f"{hub.url}/{repo}", "name": req["name"]})
                parts = self.path.split("/")  # /api/models/ORG/NAME/{preupload|commit|branch}/REV
                repo = "/".join(parts[3:5])
                if parts[5] == "branch":
                    hub.branches.setdefault(repo, set()).add(unquote(parts[6]))
                    return self.send(200, {})
                if parts[5] == "preupload":
                    files = json.loads(data)["files"]
                    return self.send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                      "shouldIgnore": False} for f in files]})
                if parts[5] == "commit":
                    for line in data.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files.setdefault(repo, {})[item["value"]["path"]] = base64.b64decode(
                                item["value"]["content"])
                            hub.revisions.setdefault(repo, {}).setdefault(unquote(parts[6]), set()).add(
                                item["value"]["path"])
                    return self.send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}",
                                           "commitOid": "a" * 40})
                self.send(404, {"error": "unknown endpoint"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
