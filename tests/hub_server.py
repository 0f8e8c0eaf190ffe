"""A loopback Hub for the push tests: huggingface_hub's own client against a local server.

`FakeHub` implements, on 127.0.0.1, the part of the Hub API that huggingface_hub 2.4 calls for
create_repo, create_branch and upload_folder without Xet: README validation, preupload (the
server decides regular vs LFS, as the Hub does: binary or >= 10 MiB -> LFS), the LFS batch API
with basic and multipart transfers, and the ndjson commit. Uploads are stored under a temp dir.
Nothing of huggingface_hub is mocked; `point_huggingface_hub_at` only points its constants at the
server (HF_ENDPOINT) and switches Xet off, since with hf_xet installed huggingface_hub uploads
through Xet storage, which needs a CAS server.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub
import yaml

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's: larger files must go through LFS
PART_SIZE = 4 * 1024 * 1024  # multipart chunk for LFS objects larger than one part
UPLOAD_ROUTES = ("preupload", "lfs-batch", "lfs-put", "lfs-part", "lfs-complete", "lfs-verify", "commit")


class FakeHub:
    """A minimal Hub: repos of branches of files, an LFS object store, a log of every request."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()
        self.repos: dict = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.lfs: dict = {}  # oid -> size (bytes under root/lfs/<oid>)
        self.parts: dict = {}  # (oid, n) -> bytes
        self.log: list = []  # (method, route, path, authorization)
        self.failures: dict = {}  # route -> [status, ...] answered before serving it
        self.commits: list = []
        self.modes: dict = {}  # path -> "file" | "lfsFile", as last committed
        (root / "lfs").mkdir(parents=True)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def fail(self, route: str, *statuses: int):
        self.failures.setdefault(route, []).extend(statuses)

    def routes(self):
        return [r for _, r, _, _ in self.log]

    def files(self, repo_id: str, branch: str = "main") -> dict:
        return self.repos[repo_id]["branches"][branch]

    def lfs_bytes(self, oid: str) -> bytes:
        return (self.root / "lfs" / oid).read_bytes()


def _handler(hub_: FakeHub):
    ns = r"(?P<repo>[\w.-]+/[\w.-]+)"
    routes = [
        ("POST", "create-repo", r"/api/repos/create"),
        ("POST", "validate-yaml", r"/api/validate-yaml"),
        ("POST", "branch", rf"/api/models/{ns}/branch/(?P<rev>[^/]+)"),
        ("POST", "preupload", rf"/api/models/{ns}/preupload/(?P<rev>[^/]+)"),
        ("POST", "commit", rf"/api/models/{ns}/commit/(?P<rev>[^/]+)"),
        ("GET", "model-info", rf"/api/models/{ns}(?:/revision/(?P<rev>[^/]+))?"),
        ("POST", "lfs-batch", rf"/{ns}\.git/info/lfs/objects/batch"),
        ("PUT", "lfs-put", r"/lfs/(?P<oid>[0-9a-f]{64})"),
        ("PUT", "lfs-part", r"/lfs/(?P<oid>[0-9a-f]{64})/part/(?P<n>\d+)"),
        ("POST", "lfs-complete", r"/lfs/(?P<oid>[0-9a-f]{64})/complete"),
        ("POST", "lfs-verify", r"/lfs/(?P<oid>[0-9a-f]{64})/verify"),
    ]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload=None, headers=None):
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self, method: str):
            path = unquote(urlsplit(self.path).path)
            body = self._body()
            for m, name, pattern in routes:
                match = re.fullmatch(pattern, path)
                if m == method and match:
                    with hub_.lock:
                        hub_.log.append((method, name, path, self.headers.get("Authorization")))
                        pending = hub_.failures.get(name)
                        status = pending.pop(0) if pending else None
                    if status:
                        return self._send(status, {"error": f"injected {status}"})
                    with hub_.lock:
                        return getattr(self, "do_" + name.replace("-", "_"))(body, **match.groupdict())
            self._send(404, {"error": f"no route {method} {path}"})

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        # -- repos ----------------------------------------------------------------------------
        def _repo(self, repo, rev=None):
            if repo not in hub_.repos:
                self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return None
            if rev is not None and rev not in hub_.repos[repo]["branches"]:
                self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                return None
            return hub_.repos[repo]

        def do_create_repo(self, body):
            req = json.loads(body)
            repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
            if repo_id in hub_.repos:
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub_.url}/{repo_id}"})
            hub_.repos[repo_id] = {"private": req.get("visibility") == "private", "branches": {"main": {}}}
            self._send(200, {"url": f"{hub_.url}/{repo_id}", "name": repo_id})

        def do_branch(self, body, repo, rev):
            r = self._repo(repo)
            if r is None:
                return
            if rev in r["branches"]:
                return self._send(409, {"error": "Reference already exists"})
            r["branches"][rev] = dict(r["branches"]["main"])
            self._send(200, {})

        def do_model_info(self, body, repo, rev=None):
            r = self._repo(repo, rev or "main")
            if r is not None:
                files = r["branches"][rev or "main"]
                self._send(200, {"id": repo, "private": r["private"], "sha": "0" * 40,
                                 "siblings": [{"rfilename": f} for f in sorted(files)]})

        def do_validate_yaml(self, body):
            content = json.loads(body)["content"]
            parts = content.split("---\n")
            try:
                meta = yaml.safe_load(parts[1]) if content.startswith("---\n") and len(parts) > 2 else None
                bad = [b for b in (meta or {}).get("base_model") or [] if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", b)]
                if not isinstance(meta, dict) or bad:
                    raise ValueError(f"invalid metadata (base_model {bad})")
            except Exception as exc:  # noqa: BLE001
                return self._send(400, {"errors": [{"message": str(exc)}]})
            self._send(200, {"errors": [], "warnings": []})

        # -- uploads --------------------------------------------------------------------------
        def do_preupload(self, body, repo, rev):
            if self._repo(repo, rev) is None:
                return
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "shouldIgnore": False,
                      "uploadMode": "lfs" if f["size"] >= LFS_THRESHOLD or b"\0" in base64.b64decode(f["sample"])
                      else "regular"} for f in files]
            self._send(200, {"files": modes})

        def do_lfs_batch(self, body, repo):
            if self._repo(repo) is None:
                return
            objects = []
            for obj in json.loads(body)["objects"]:
                oid, size = obj["oid"], obj["size"]
                if oid in hub_.lfs:  # already stored: nothing to send
                    objects.append({"oid": oid, "size": size})
                    continue
                if size > PART_SIZE:
                    n = -(-size // PART_SIZE)
                    header = {"chunk_size": str(PART_SIZE),
                              **{f"{i:05d}": f"{hub_.url}/lfs/{oid}/part/{i}" for i in range(1, n + 1)}}
                    upload = {"href": f"{hub_.url}/lfs/{oid}/complete", "header": header}
                else:
                    upload = {"href": f"{hub_.url}/lfs/{oid}"}
                objects.append({"oid": oid, "size": size, "authenticated": True,
                                "actions": {"upload": upload, "verify": {"href": f"{hub_.url}/lfs/{oid}/verify"}}})
            self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

        def _store(self, oid: str, data: bytes) -> bool:
            if hashlib.sha256(data).hexdigest() != oid:
                self._send(400, {"error": "sha256 mismatch"})
                return False
            (hub_.root / "lfs" / oid).write_bytes(data)
            hub_.lfs[oid] = len(data)
            return True

        def do_lfs_put(self, body, oid):
            if self._store(oid, body):
                self._send(200, {})

        def do_lfs_part(self, body, oid, n):
            hub_.parts[(oid, int(n))] = body
            self._send(200, {}, {"ETag": hashlib.md5(body).hexdigest()})

        def do_lfs_complete(self, body, oid):
            parts = json.loads(body)["parts"]
            chunks = [hub_.parts[(oid, p["partNumber"])] for p in parts]
            if any(hashlib.md5(c).hexdigest() != p["etag"] for c, p in zip(chunks, parts)):
                return self._send(400, {"error": "etag mismatch"})
            if self._store(oid, b"".join(chunks)):
                self._send(200, {})

        def do_lfs_verify(self, body, oid):
            req = json.loads(body)
            ok = hub_.lfs.get(oid) == req["size"]
            self._send(200 if ok else 404, {} if ok else {"error": "object not found"})

        def do_commit(self, body, repo, rev):
            r = self._repo(repo, rev)
            if r is None:
                return
            new = dict(r["branches"][rev])
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key in ("file", "lfsFile"):
                    hub_.modes[value["path"]] = key
                if key == "file":
                    new[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    if value["oid"] not in hub_.lfs:
                        return self._send(422, {"error": f"LFS object {value['oid']} of {value['path']} not uploaded"})
                    new[value["path"]] = hub_.lfs_bytes(value["oid"])
                elif key == "deletedFile":
                    new.pop(value["path"], None)
                elif key != "header":
                    return self._send(400, {"error": f"unknown commit item {key}"})
            r["branches"][rev] = new
            oid = hashlib.sha1(repr(sorted(new)).encode() + str(len(hub_.commits)).encode()).hexdigest()
            hub_.commits.append((repo, rev, oid))
            self._send(200, {"commitUrl": f"{hub_.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    return Handler


def point_huggingface_hub_at(server: FakeHub, monkeypatch) -> None:
    """huggingface_hub's endpoint (env and constants) set to the server, and Xet off."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


def api_auth(server: FakeHub) -> set:
    """Authorization headers of the Hub API calls (LFS part/object PUTs go to storage URLs, unauthenticated)."""
    return {a for _, route, _, a in server.log if route not in ("lfs-put", "lfs-part", "lfs-complete")}
