"""A Hugging Face Hub on 127.0.0.1 that serves folders as model repositories.

It answers the calls ``huggingface_hub`` 2.x makes for ``DiffusionPipeline.from_pretrained``:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info with
  ``sha`` and ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}?recursive=...``: the file listing;
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}``: the file, with ``X-Repo-Commit`` and
  ``ETag`` (``X-Linked-Etag`` / ``X-Linked-Size`` for weight files, as the Hub does for LFS).

Unknown repositories and files get a 404 with the Hub's ``X-Error-Code``; with ``token``
set, a request without ``Authorization: Bearer <token>`` gets a 401. With ``drop`` set, it
closes every connection without an answer (a hub that is up but broken). Every request is
recorded in ``requests`` so a test can see what was downloaded and with which headers.
Several repository ids may serve one folder. Point a process at it with
``HF_ENDPOINT=<hub.url>``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".onnx", ".msgpack")


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]

    @property
    def file(self) -> str | None:
        """``unet/config.json`` for a ``/{repo}/resolve/{rev}/unet/config.json`` request."""
        parts = self.path.split("/")
        if len(parts) > 5 and parts[3] == "resolve":
            return "/".join(parts[5:])
        return None


class _Repo:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        digest = hashlib.sha1()
        self.sha256: dict[str, str] = {}
        for name in self.files:
            data = (folder / name).read_bytes()
            self.sha256[name] = hashlib.sha256(data).hexdigest()
            digest.update(name.encode() + b"\0" + self.sha256[name].encode())
        self.commit = digest.hexdigest()  # 40 hex digits, stable for the same content

    def is_lfs(self, name: str) -> bool:
        return name.endswith(_LFS_SUFFIXES)

    def git_oid(self, name: str) -> str:
        data = (self.folder / name).read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def etag(self, name: str) -> str:
        return self.sha256[name] if self.is_lfs(name) else self.git_oid(name)

    def tree_entry(self, name: str) -> dict[str, Any]:
        size = (self.folder / name).stat().st_size
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid(name), "size": size, "path": name}
        if self.is_lfs(name):
            entry["lfs"] = {"oid": self.sha256[name], "size": size, "pointerSize": 134}
        return entry


class FakeHub:
    """``FakeHub({"org/name": folder})``; ``start()`` / ``stop()`` (restartable on the same port)."""

    def __init__(self, repos: dict[str, Path], *, token: str | None = None) -> None:
        self.repos = {repo_id: _Repo(Path(folder)) for repo_id, folder in repos.items()}
        self.token = token
        self.drop = False
        self.requests: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut the open (keep-alive) connections: a stopped hub answers nothing."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what was asked --------------------------------------------------------------------
    def record(self, request: SeenRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def files_downloaded(self, repo_id: str) -> set[str]:
        """Files of ``repo_id`` whose body was sent (GET), not just their headers (HEAD)."""
        with self._lock:
            seen = list(self.requests)
        return {r.file for r in seen if r.method == "GET" and r.file and r.path.startswith(f"/{repo_id}/resolve/")}

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    def _closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up (a stopped hub cuts them off) are expected here


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def setup(self) -> None:
        super().setup()
        self.fake._opened(self.connection)

    def finish(self) -> None:
        self.fake._closed(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._handle(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._handle(body=True)

    # -- routing ----------------------------------------------------------------------------
    def _handle(self, *, body: bool) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        self.fake.record(SeenRequest(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        if self.fake.drop:
            self.close_connection = True
            return None
        if self.fake.token is not None and self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            return self._error(
                401, "GatedRepo", "Access to this repository is restricted: a valid token is required.", body
            )
        parts = path.strip("/").split("/")
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo = self._repo("/".join(parts[2:4]), body)
            if repo is None:
                return None
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                return self._model_info("/".join(parts[2:4]), repo, body)
            if rest[0] == "tree":
                return self._tree(repo, "/".join(rest[2:]), parse_qs(split.query), body)
            return self._error(404, None, "Not found", body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo("/".join(parts[:2]), body)
            if repo is None:
                return None
            return self._file(repo, "/".join(parts[4:]), body)
        return self._error(404, None, "Not found", body)

    def _repo(self, repo_id: str, body: bool) -> _Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.", body)
        return repo

    # -- endpoints ----------------------------------------------------------------------------
    def _model_info(self, repo_id: str, repo: _Repo, body: bool) -> None:
        info = {
            "_id": repo.commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": repo.commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "library_name": "diffusers",
            "tags": ["diffusers", "safetensors"],
            "pipeline_tag": "text-to-image",
            "siblings": [{"rfilename": name} for name in repo.files],
        }
        self._json(200, info, body)

    def _tree(self, repo: _Repo, sub: str, query: dict[str, list[str]], body: bool) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for name in repo.files:
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix) :]
            if "/" in rel:
                folder = prefix + rel.split("/", 1)[0]
                if folder not in folders:
                    folders.add(folder)
                    entries.append(
                        {
                            "type": "directory",
                            "oid": hashlib.sha1(folder.encode()).hexdigest(),
                            "size": 0,
                            "path": folder,
                        }
                    )
                if not recursive:
                    continue
            entries.append(repo.tree_entry(name))
        self._json(200, entries, body)

    def _file(self, repo: _Repo, name: str, body: bool) -> None:
        if name not in repo.sha256:
            return self._error(404, "EntryNotFound", f"Entry Not Found for url: {self.path}.", body, repo=repo)
        data = (repo.folder / name).read_bytes()
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(name)}"', "Accept-Ranges": "bytes"}
        if repo.is_lfs(name):
            headers["X-Linked-Etag"] = f'"{repo.etag(name)}"'
            headers["X-Linked-Size"] = str(len(data))
        status = 200
        start = self._range_start(len(data))
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data = data[start:]
            status = 206
        self._send(status, data, "application/octet-stream", headers, body)

    def _range_start(self, size: int) -> int:
        # Only the "bytes=N-" form, which is what a resumed download sends.
        value = self.headers.get("Range", "")
        if value.startswith("bytes=") and value.endswith("-"):
            try:
                start = int(value[len("bytes=") : -1])
            except ValueError:
                return 0
            return start if 0 < start < size else 0
        return 0

    # -- responses ----------------------------------------------------------------------------
    def _json(self, status: int, payload: Any, body: bool) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", {}, body)

    def _error(self, status: int, code: str | None, message: str, body: bool, *, repo: _Repo | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if repo is not None:
            headers["X-Repo-Commit"] = repo.commit
        self._send(status, json.dumps({"error": message}).encode(), "application/json", headers, body)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)
