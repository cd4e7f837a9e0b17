"""A fake Hugging Face Hub on 127.0.0.1: just the part of the API that huggingface_hub's create_repo and
upload_folder use. Checked against huggingface_hub 2.4.0 with HF_HUB_DISABLE_XET=1: with hf_xet installed and
xet on, 2.4 sends every LFS file to a xet storage server without asking the LFS batch API, and that is not faked.

Requests, in the order the client makes them:
  POST /api/repos/create                        {"name", "organization", "visibility" (or "private", as
                                                huggingface_hub 1.3 sends)} -> {"url"}; 409 if it exists
  POST /api/validate-yaml  (twice)              README.md -> {"errors": [], "warnings": []}
  POST /api/models/{repo}/preupload/{rev}       {"files": [{path, sample (base64), size}]} -> uploadMode per file
  POST /{repo}.git/info/lfs/objects/batch       git-lfs batch API, transfers ["basic", "multipart"]: we pick basic
  PUT  /lfs/{oid}                               the bytes of one LFS file (a presigned URL: no token)
  POST /lfs/{oid}/verify                        {"oid", "size"}
  POST /api/models/{repo}/commit/{rev}          ndjson: header, then `file` (base64) and `lfsFile` (oid) lines
  GET  /api/models/{repo}                       repo info (asked when create_repo is refused)
  GET  /api/agent-harnesses                     once a day, for the User-Agent (unless HF_HUB_DISABLE_TELEMETRY)

Use the `hub_server` fixture and point the client at `hub_server.url` with HF_ENDPOINT (or HfApi(endpoint=...)),
with `hub_server.token` as the token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

TOKEN = "hf_fake_token_for_tests"
# Roughly the Hub's rule: these suffixes, binary content and large files go to LFS, the rest inline.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".png")
LFS_MIN_SIZE = 10 * 1024 * 1024
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = {
    "POST": [(r"/api/repos/create", "create"), (r"/api/validate-yaml", "validate_yaml"),
             (rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
             (rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
             (r"/lfs/(?P<oid>[0-9a-f]{64})/verify", "lfs_verify"),
             (rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit")],
    "PUT": [(r"/lfs/(?P<oid>[0-9a-f]{64})", "lfs_put")],
    "GET": [(rf"/api/models/{REPO}(?:/revision/[^/]+)?", "repo_info"), (r"/api/agent-harnesses", "agents")],
}


@dataclass
class Request:
    method: str
    path: str
    headers: dict
    body: bytes = b""


@dataclass
class FakeHub:
    token: str = TOKEN
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    # {repo_id: {"private": bool, "files": {path: bytes}, "lfs_files": {path}, "commits": [summary]}}
    repos: dict = field(default_factory=dict)
    lfs: dict = field(default_factory=dict)  # {sha256 oid: bytes} received by PUT
    failed: list[Request] = field(default_factory=list)  # no route, or the fake hub raised

    def start(self) -> "FakeHub":
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(self))  # port 0: any free port
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, req: Request) -> tuple[int, dict]:
        """(status, JSON answer) for one request."""
        path = req.path.split("?")[0]
        for pattern, name in ROUTES.get(req.method, []):
            if match := re.fullmatch(pattern, path):
                break
        else:
            self.failed.append(req)
            return 404, {"error": f"fake hub: no route for {req.method} {path}"}
        # Everything but the presigned LFS upload and the public agent list needs the token.
        if name not in ("lfs_put", "agents") and req.headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        try:
            with self.lock:
                return getattr(self, name)(req, **match.groupdict())
        except Exception as e:  # a 4xx, not a 5xx: the client retries 5xx for a while
            self.failed.append(req)
            return 400, {"error": f"fake hub: {e!r}"}

    def create(self, req):
        body = json.loads(req.body)
        repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        private = body.get("visibility") == "private" or body.get("private") is True
        self.repos[repo_id] = {"private": private, "files": {}, "lfs_files": set(),
                               "commits": []}
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, req):
        content = json.loads(req.body)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": str(e)}]}
        return (200, {"errors": [], "warnings": []}) if isinstance(meta, dict) else \
            (400, {"errors": [{"message": "metadata is not a mapping"}]})

    def preupload(self, req, repo, rev):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        files = []
        for f in json.loads(req.body)["files"]:
            binary = b"\0" in base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or binary or f["size"] >= LFS_MIN_SIZE
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": None})
        return 200, {"files": files, "commitOid": "0" * 40}

    def lfs_batch(self, req, repo):
        body = json.loads(req.body)
        if "basic" not in body.get("transfers", ["basic"]):
            return 422, {"error": f"fake hub: only the basic transfer, offered {body['transfers']}"}
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:  # no actions: already stored
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs/{obj['oid']}"},
                                    "verify": {"href": f"{self.url}/lfs/{obj['oid']}/verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, req, oid):
        if hashlib.sha256(req.body).hexdigest() != oid:
            return 400, {"error": "sha256 of the body does not match the oid"}
        self.lfs[oid] = req.body
        return 200, {}

    def lfs_verify(self, req, oid):
        size = json.loads(req.body)["size"]
        return (200, {}) if oid in self.lfs and len(self.lfs[oid]) == size else (404, {"error": "object not found"})

    def commit(self, req, repo, rev):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if lines[0]["key"] != "header":
            return 400, {"error": "the first ndjson line must be the header"}
        files, lfs_files = {}, set()
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                data = self.lfs.get(value["oid"])
                if data is None or len(data) != value.get("size", len(data)):
                    return 400, {"error": f"LFS object {value['oid']} of {value['path']} was not uploaded"}
                files[value["path"]] = data
                lfs_files.add(value["path"])
            else:
                return 400, {"error": f"fake hub: unsupported commit entry {line['key']}"}
        state = self.repos[repo]
        state["files"].update(files)
        state["lfs_files"] = (state["lfs_files"] - set(files)) | lfs_files
        state["commits"].append(lines[0]["value"]["summary"])
        oid = hashlib.sha1(req.body).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def repo_info(self, req, repo):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        state = self.repos[repo]
        return 200, {"id": repo, "private": state["private"], "sha": "0" * 40,
                     "siblings": [{"rfilename": p} for p in sorted(state["files"])]}

    def agents(self, req):
        return 200, {"standardEnvVars": [], "harnesses": {}}  # nobody is detected as an AI agent


def handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # the client always sends it
            req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            hub.requests.append(req)
            status, payload = hub.handle(req)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 400:
                self.send_header("X-Error-Message", payload.get("error", ""))
                if payload.get("error") == "Repository not found":
                    self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = answer

        def log_message(self, *args):
            pass  # quiet: every request is in hub.requests

    return Handler


@pytest.fixture
def hub_server():
    """A fresh fake Hub per test: .url, .token, .requests, .repos {repo_id: {"private", "files", "lfs_files",
    "commits"}}, .lfs {oid: bytes}, .failed (requests it could not answer)."""
    hub = FakeHub().start()
    yield hub
    hub.stop()
