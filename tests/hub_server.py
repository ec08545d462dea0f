"""A small Hugging Face Hub emulator on 127.0.0.1, for tests that drive the real huggingface_hub.

It answers the endpoints that ``HfApi.model_info``, ``HfApi.list_repo_tree``, ``hf_hub_download``
and ranged reads call, the way the Hub does (same headers, same ``X-Error-Code`` values):

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: ``id``, ``sha``,
  ``siblings``
- ``GET /api/models/{repo}/tree/{rev}``: top-level files with size, git oid and LFS info
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (sha256 for LFS
  files, git blob sha1 otherwise), ``Content-Length``, ``Accept-Ranges``, and ``Range`` (206 +
  ``Content-Range``)
- 404 ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``; 401 ``GatedRepo`` for a gated
  repo and 401 ``RepoNotFound`` for a private one, when the request has no accepted token

Every request is recorded (method, path, Range header, bytes of body sent, whether it carried a
token), so a test can prove what was and was not downloaded. Repos are made from directories
(e.g. generated in ``tmp_path``); each ``add_commit`` snapshots the files' bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class Blob:
    data: bytes

    @property
    def git_oid(self) -> str:
        return hashlib.sha1(b"blob %d\x00" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    gated: bool = False
    private: bool = False
    tokens: set[str] = field(default_factory=set)  # tokens granted access (gated/private)


@dataclass(frozen=True)
class Record:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int
    authorized: bool  # an Authorization header was sent

    @property
    def file(self) -> str | None:
        """The file name of a /resolve/ request."""
        m = re.match(r"^/[^/]+/[^/]+/resolve/[^/]+/(.+)$", self.path)
        return unquote(m.group(1)) if m else None

    @property
    def repo(self) -> str | None:
        """The repo id of a /resolve/ request."""
        m = re.match(r"^/([^/]+/[^/]+)/resolve/", self.path)
        return m.group(1) if m else None


def etag_of(name: str, blob: Blob) -> str:
    """What the Hub sends as ETag, and so the blob's name in the huggingface_hub cache."""
    return blob.sha256 if name.endswith(LFS_SUFFIXES) else blob.git_oid


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.records: list[Record] = []
        self.drop_after: dict[str, int] = {}  # file name -> bytes sent before the connection dies
        self.rate_limit: dict[str, int] = {}  # file name -> GETs answered 429 before serving
        self._dropped: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # -- repos ---------------------------------------------------------------------------
    def add_commit(self, repo_id: str, directory: Path, *, branch: str = "main") -> str:
        files = {p.name: Blob(p.read_bytes()) for p in sorted(directory.iterdir()) if p.is_file()}
        repo = self.repos.setdefault(repo_id, Repo())
        listing = "".join(f"{n}:{b.git_oid}\n" for n, b in files.items())
        sha = hashlib.sha1(f"{repo_id}\n{len(repo.commits)}\n{listing}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.refs[branch] = sha
        return sha

    def tag(self, repo_id: str, name: str, sha: str) -> None:
        self.repos[repo_id].refs[name] = sha

    # -- request log ---------------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            self.records.clear()

    def downloads(self, suffix: str = ".safetensors") -> list[Record]:
        """Whole-file GETs (no Range): what hf_hub_download does to fetch a file."""
        return [
            r
            for r in self.records
            if r.method == "GET" and r.range is None and (r.file or "").endswith(suffix)
        ]

    def bytes_sent(self, repo: str, file: str) -> int:
        return sum(
            r.body_bytes
            for r in self.records
            if r.method == "GET" and r.repo == repo and r.file == file
        )

    # -- server --------------------------------------------------------------------------
    def start(self, port: int = 0) -> str:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects from the Hub

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    # -- plumbing ------------------------------------------------------------------------
    def _record(self, status: int, body_bytes: int) -> None:
        with self.fake._lock:
            self.fake.records.append(
                Record(
                    self.command,
                    urlsplit(self.path).path,
                    self.headers.get("Range"),
                    status,
                    body_bytes,
                    self.headers.get("Authorization") is not None,
                )
            )

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # Recorded before the body goes out: once the client has the response it may check the
        # records at once, and must find this request there.
        sent = 0 if self.command == "HEAD" else len(body)
        self._record(status, sent)
        if sent:
            self.wfile.write(body)

    def _error(
        self, status: int, code: str, message: str, extra: dict[str, str] | None = None
    ) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Error-Code": code,
            "X-Error-Message": message,
        }
        self._send(status, body, {**headers, **(extra or {})})

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _repo(self, repo_id: str) -> Repo | None:
        """The repo, or None after answering 404/401 as the Hub does."""
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if (repo.gated or repo.private) and self._token() not in repo.tokens:
            if repo.gated:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
            else:
                self._error(401, "RepoNotFound", "Invalid username or password.")
            return None
        return repo

    def _commit(self, repo: Repo, rev: str) -> str | None:
        sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    # -- endpoints -----------------------------------------------------------------------
    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
        if m:
            return self._model_info(m.group(1), unquote(m.group(2) or "main"))
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)$", path)
        if m:
            return self._tree(m.group(1), unquote(m.group(2)))
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)))
        return self._send(404, b"not found")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _model_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._commit(repo, rev)
        if sha is None:
            return
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "sha": sha,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "siblings": [{"rfilename": n} for n in repo.commits[sha]],
        }
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _tree(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._commit(repo, rev)
        if sha is None:
            return
        entries = []
        for name, blob in repo.commits[sha].items():
            entry: dict[str, Any] = {
                "type": "file",
                "oid": blob.git_oid,
                "size": len(blob.data),
                "path": name,
            }
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
            entries.append(entry)
        self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, rev: str, name: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return None
        sha = self._commit(repo, rev)
        if sha is None:
            return None
        blob = repo.commits[sha].get(name)
        if blob is None:
            return self._error(
                404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": sha}
            )
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{etag_of(name, blob)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        data = blob.data
        wanted = self.headers.get("Range")
        if self.command == "GET" and self.fake.rate_limit.get(name, 0) > 0:
            with self.fake._lock:
                self.fake.rate_limit[name] -= 1
            return self._error(429, "RateLimited", "slow down", {"Retry-After": "1"})
        if self.command == "GET" and name in self.fake.drop_after:
            if name in self.fake._dropped:
                return self._hang_up()
            if wanted is None:
                self.fake._dropped.add(name)
                return self._send_truncated(data, headers, self.fake.drop_after[name])
        if wanted is None:
            return self._send(200, data, headers)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
        start = int(m.group(1)) if m else len(data)
        stop = min(int(m.group(2)) + 1 if m and m.group(2) else len(data), len(data))
        if start >= len(data) or stop <= start:
            return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        return self._send(206, data[start:stop], headers)

    def _send_truncated(self, data: bytes, headers: dict[str, str], keep: int) -> None:
        """Announce the whole file, send ``keep`` bytes, then drop the connection."""
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._record(200, keep)  # before the bytes: see _send
        self.wfile.write(data[:keep])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)

    def _hang_up(self) -> None:
        """The server is gone: close without an answer."""
        self._record(0, 0)
        self.close_connection = True
        self.connection.shutdown(2)


def main(argv: list[str] | None = None) -> None:
    """Serve checkpoint directories as Hub repos, to try Hub sources without a network:

    python -m tests.hub_server --port 8999 org/base=demo/base org/ft=demo/finetuned
    HF_ENDPOINT=http://127.0.0.1:8999 fapm prune -b org/base -f org/ft -o out
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.hub_server", description=main.__doc__)
    parser.add_argument("--port", type=int, default=8999)
    parser.add_argument("repos", nargs="+", metavar="ORG/NAME=DIR")
    args = parser.parse_args(argv)
    hub = FakeHub()
    for spec in args.repos:
        repo_id, _, directory = spec.partition("=")
        print(f"{repo_id} @ {hub.add_commit(repo_id, Path(directory))}", flush=True)
    print(f"serving on {hub.start(args.port)}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
