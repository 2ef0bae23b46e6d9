"""A fake Hugging Face Hub on localhost: the few endpoints an upload uses, read from ``huggingface_hub`` 2.x
(``hf_api.py``, ``_commit_api.py``, ``lfs.py``), with every request recorded.

- ``POST /api/repos/create``: ``{name, organization, type, visibility}``; 409 when the repository exists;
- ``POST /api/{type}s/{repo}/branch/{branch}``: a branch copied from ``main``; 409 when it exists;
- ``POST /api/validate-yaml``: the README's metadata; answered with no errors (the real rules are the Hub's);
- ``POST /api/{type}s/{repo}/preupload/{revision}``: ``lfs`` for files that look binary (a NUL byte in the
  sample, as git decides), ``regular`` (sent inline, base64) for text;
- ``POST /{prefix}{repo}.git/info/lfs/objects/batch``: an upload action per object, pointing back here;
- ``PUT /lfs/{oid}``: the object's bytes, refused unless their sha256 is ``oid``;
- ``POST /api/{type}s/{repo}/commit/{revision}``: NDJSON (header, ``file`` with base64 content, ``lfsFile``
  naming an uploaded object); the branch's files are replaced by the commit's.

Anything else is a 404, so a client calling an endpoint this module does not know fails loudly.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    type: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})


@dataclass
class Request:
    method: str
    path: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeHub:
    """A running fake Hub: ``url`` to point ``HF_ENDPOINT`` at, ``repos`` and ``requests`` to inspect."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lfs: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        with self.lock:
            self.requests.append(Request(method, path, body))
        route = unquote(urlparse(path).path)
        repo_path = r"(?P<type>model|dataset)s/(?P<repo>[^/]+/[^/]+)"
        if method == "POST" and route == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and route == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if method == "PUT" and (match := re.fullmatch(r"/lfs/(?P<oid>[0-9a-f]{64})", route)):
            if hashlib.sha256(body).hexdigest() != match["oid"]:
                return 400, {"error": "sha256 mismatch"}
            self.lfs[match["oid"]] = body
            return 200, {}
        if method == "POST" and (
            match := re.fullmatch(
                r"/(?P<prefix>datasets/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", route
            )
        ):
            objects = json.loads(body)["objects"]
            actions = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {"upload": {"href": f"{self.url}/lfs/{o['oid']}"}},
                }
                for o in objects
            ]
            return 200, {"transfer": "basic", "objects": actions}
        if method == "GET" and (match := re.fullmatch(rf"/api/{repo_path}", route)):
            repo = self.repos.get(match["repo"])
            if repo is None or repo.type != match["type"]:  # models/me/x is not datasets/me/x
                return 404, {"error": f"Repository not found: {match['repo']}"}
            return 200, {"id": match["repo"], "private": repo.private, "sha": "0" * 40}
        if method == "GET" and (match := re.fullmatch(rf"/api/{repo_path}/tree/(?P<rev>[^/]+)", route)):
            repo = self.repos.get(match["repo"])
            if repo is None or repo.type != match["type"] or match["rev"] not in repo.branches:
                return 404, {"error": f"Repository or revision not found: {match['repo']}@{match['rev']}"}
            tree = repo.branches[match["rev"]]
            return 200, [
                {"type": "file", "path": p, "size": len(b), "oid": "0" * 40} for p, b in tree.items()
            ]
        match = re.fullmatch(rf"/api/{repo_path}/(?P<action>branch|preupload|commit)/(?P<rev>[^/]+)", route)
        if method != "POST" or match is None:
            return 404, {"error": f"the fake Hub has no {method} {route}"}
        repo = self.repos.get(match["repo"])
        if repo is None or repo.type != match["type"]:
            return 404, {"error": f"Repository not found: {match['repo']}"}
        if match["action"] == "branch":
            if match["rev"] in repo.branches:
                return 409, {"error": "Reference already exists"}
            repo.branches[match["rev"]] = dict(repo.branches["main"])
            return 200, {}
        if match["rev"] not in repo.branches:
            return 404, {"error": f"Invalid rev id: {match['rev']}"}
        if match["action"] == "preupload":
            files = json.loads(body)["files"]
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if b"\0" in base64.b64decode(f["sample"]) else "regular",
                    "shouldIgnore": False,
                }
                for f in files
            ]
            return 200, {"files": modes}
        return self._commit(match["repo"], repo, match["rev"], body)

    def _create(self, payload: dict[str, Any]) -> tuple[int, Any]:
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this repo", "url": f"{self.url}/{repo_id}"}
        kind = payload.get("type") or "model"
        self.repos[repo_id] = Repo(kind, payload.get("visibility") == "private")
        prefix = "" if kind == "model" else f"{kind}s/"
        return 200, {"url": f"{self.url}/{prefix}{repo_id}"}

    def _commit(self, repo_id: str, repo: Repo, branch: str, body: bytes) -> tuple[int, Any]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "the commit must start with a header"}
        files = dict(repo.branches[branch])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 400, {"error": f"LFS object {value['oid']} was never uploaded"}
                files[value["path"]] = self.lfs[value["oid"]]
            elif line["key"] == "deletedFile":
                if files.pop(value["path"], None) is None:
                    return 404, {"error": f"no file {value['path']} to delete"}
            else:
                return 400, {"error": f"the fake Hub does not support {line['key']}"}
        repo.branches[branch] = files
        oid = hashlib.sha1(body).hexdigest()
        prefix = "" if repo.type == "model" else f"{repo.type}s/"
        return 200, {"commitUrl": f"{self.url}/{prefix}{repo_id}/commit/{oid}", "commitOid": oid}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            body = self._chunked() if self.headers.get("Transfer-Encoding") == "chunked" else self._sized()
            status, payload = hub.handle(self.command, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _sized(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _chunked(self) -> bytes:
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return body

        do_GET = do_POST = do_PUT = _serve  # noqa: N815  (http.server dispatches on these names)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
