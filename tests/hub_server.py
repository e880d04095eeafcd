"""A small Hugging Face Hub API server for offline tests: the endpoints `huggingface_hub` and `transformers` call to
push a model (``create_repo``, ``upload_folder``, ``push_to_hub``) and to load it back by repo id
(``from_pretrained(repo_id, revision=...)``, ``hf_hub_download``, ``snapshot_download``), and nothing else.

No package runs the Hub's *write* API locally, so the round trip ``push_to_hub`` -> ``from_pretrained(repo_id)`` is
tested against this server, driven by the real clients. Standard library only.

Storage: file contents live in ``root/blobs/<git blob id>`` (content-addressed, so unchanged files cost nothing);
each repository keeps every commit's complete file table in memory, so ``revision=<old commit id>`` serves the old
content exactly as the Hub does. Model repositories only; no authentication (the clients send no token unless one
exists, and anything sent is ignored); no LFS/Xet (the preupload answer sends every file inline, see ``preupload``).

Clients find the server through ``HF_ENDPOINT=http://127.0.0.1:PORT``, which must be set before huggingface_hub is
imported (it is read at import). Run it by hand with ``python tests/hub_server.py --port 8000``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

USER = "user"  # the namespace of repo ids created without one, and whoami's answer
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")
_REPO = r"(?P<repo>[^/]+/[^/]+)"


class HubError(Exception):
    """An error answer. ``code`` goes to the ``X-Error-Code`` header, which is what huggingface_hub turns into
    ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError`` (a bare 404 is a generic error;
    transformers tolerates a missing optional file only as ``EntryNotFound``)."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra or {}


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content: huggingface_hub computes the same for regular files and compares it to
    the preupload answer's ``oid`` to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, tuple[str, int]]  # path -> (blob id, size)
    summary: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id


class HubStore:
    """Repositories, commits and blobs. One lock: requests arrive on several threads."""

    def __init__(self, root: str | Path):
        self.blobs = Path(root) / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self._count = 0

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def resolve(self, repo_id: str, revision: str) -> Commit:
        """A branch name or a full commit id -> the commit (what ``revision=`` means to the clients)."""
        repo = self.repo(repo_id)
        oid = repo.branches.get(revision, revision if revision in repo.commits else None)
        if oid is None:
            raise HubError(404, f"Revision {revision!r} not found in {repo_id}", "RevisionNotFound")
        return repo.commits[oid]

    def create(self, repo_id: str, private: bool) -> bool:
        """A new repository with an empty first commit on ``main`` (as the Hub's, it has a commit id at once);
        False if it exists."""
        with self.lock:
            if repo_id in self.repos:
                return False
            repo = self.repos[repo_id] = Repo(repo_id, private)
            self._add_commit(repo, "main", None, {}, "initial commit")
            return True

    def _add_commit(self, repo: Repo, branch: str, parent: str | None, files: dict, summary: str) -> str:
        self._count += 1
        seed = json.dumps([repo.repo_id, parent, sorted(files.items()), summary, self._count, time.time_ns()])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo.commits[oid] = Commit(oid, parent, dict(files), summary, date)
        repo.branches[branch] = oid
        return oid

    def put_blob(self, data: bytes) -> tuple[str, int]:
        oid = git_blob_id(data)
        path = self.blobs / oid
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return oid, len(data)

    def read_blob(self, oid: str) -> bytes:
        return (self.blobs / oid).read_bytes()

    def commit(self, repo_id: str, branch: str, header: dict, operations: list[tuple[str, dict]]) -> str:
        """Apply ``operations`` on top of ``branch``'s head as one new commit; refused whole on any bad operation.

        ``parentCommit`` (sent by ``create_commit(parent_commit=...)``) must be the branch's head: the client's
        guard against overwriting a push it has not seen, answered 412 as the Hub does.
        """
        with self.lock:
            repo = self.repo(repo_id)
            if branch not in repo.branches:
                if branch in repo.commits:
                    raise HubError(400, f"commits go to a branch, not to commit {branch}")
                raise HubError(404, f"Branch {branch!r} not found in {repo_id}", "RevisionNotFound")
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise HubError(412, f"parentCommit {parent} is not the head of {branch!r} ({head}): pull first")
            files = dict(repo.commits[head].files)
            for key, value in operations:
                path = _checked_path(value.get("path"))
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"file {path}: encoding must be 'base64', got {value.get('encoding')!r}")
                    files[path] = self.put_blob(base64.b64decode(value["content"], validate=True))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"cannot delete {path}: no such file", "EntryNotFound")
                elif key == "deletedFolder":
                    inside = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                    if not inside:
                        raise HubError(404, f"cannot delete folder {path}: no such folder", "EntryNotFound")
                    for p in inside:
                        del files[p]
                else:  # lfsFile never comes: preupload answers "regular" for every file
                    raise HubError(400, f"commit line {key!r} is not supported (only file, deletedFile, deletedFolder)")
            return self._add_commit(repo, branch, head, files, str(header.get("summary", "")))

    def create_branch(self, repo_id: str, branch: str, starting_point: str | None) -> None:
        with self.lock:
            repo = self.repo(repo_id)
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch!r} already exists in {repo_id}")  # exist_ok=True reads 409
            _checked_path(branch)
            repo.branches[branch] = self.resolve(repo_id, starting_point or "main").oid


def _checked_path(path) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
        raise HubError(400, f"invalid path in repo: {path!r}")
    return path


def _tree_id(entries: list) -> str:
    return hashlib.sha1(json.dumps(sorted(entries)).encode()).hexdigest()


def tree_listing(commit: Commit, path: str, recursive: bool) -> list[dict]:
    """``list_repo_tree``'s answer: files as ``{type: file, path, size, oid}``, folders as ``{type: directory, path,
    oid}``; the folder's direct children, or everything below it when ``recursive``. A missing folder is
    ``EntryNotFound`` (transformers lists ``additional_chat_templates`` and takes that as "no templates")."""
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    below = {p: v for p, v in commit.files.items() if p.startswith(prefix)}
    if prefix and not below:
        raise HubError(404, f"{path} not found at {commit.oid}", "EntryNotFound")
    entries: dict[str, dict] = {}
    for p, (oid, size) in sorted(below.items()):
        parts = p[len(prefix) :].split("/")
        for depth in range(1, len(parts)):  # the folders on the way
            folder = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                inside = [(q, v[0]) for q, v in commit.files.items() if q.startswith(folder + "/")]
                entries[folder] = {"type": "directory", "path": folder, "oid": _tree_id(inside)}
        if recursive or len(parts) == 1:
            entries[p] = {"type": "file", "path": p, "size": size, "oid": oid}
    return list(entries.values())


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the ``api_*`` methods below. HTTP/1.1 with a Content-Length on every answer, so the
    clients' connection pools can keep connections open."""

    protocol_version = "HTTP/1.1"
    server: HubHTTPServer
    ROUTES = [
        ("POST", r"/api/repos/create", "api_create_repo"),
        ("POST", r"/api/validate-yaml", "api_validate_yaml"),
        ("GET", r"/api/whoami-v2", "api_whoami"),
        ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "api_preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "api_commit"),
        ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "api_create_branch"),
        ("GET", rf"/api/models/{_REPO}/refs", "api_refs"),
        ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "api_tree"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "api_model_info"),
        ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    @property
    def store(self) -> HubStore:
        return self.server.store

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{self.headers.get('Host') or f'{host}:{port}'}"

    def log_message(self, format, *args):  # quiet unless asked: tests read the clients' errors instead
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        try:
            body = self._read_body()
            for route_method, pattern, name in self.ROUTES:
                match = re.fullmatch(pattern, url.path)
                if route_method == method and match:
                    # the revision arrives URL-quoted (a branch may hold '/'); split first, then unquote
                    args = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    return getattr(self, name)(body=body, **args)
            raise HubError(404, f"this test Hub server does not implement {method} {url.path}")
        except HubError as error:
            payload = {"error": str(error), **error.extra}
            headers = {"X-Error-Message": str(error)} | ({"X-Error-Code": error.code} if error.code else {})
            self._send(error.status, json.dumps(payload).encode(), "application/json", headers)
        except Exception as error:  # a malformed request or a bug here: an answer the client shows, not a hang-up
            self._send(500, json.dumps({"error": f"test Hub server: {error!r}"}).encode(), "application/json")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self, body: bytes) -> dict:
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"request body is not JSON: {error}") from None

    def _send(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, payload, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    # ---- upload -------------------------------------------------------------------------------------------------

    def api_create_repo(self, body: bytes) -> None:
        """``create_repo``: the client builds its ``RepoUrl`` (and so the repo id ``push_to_hub`` goes on with) from
        ``url``; an existing repo is 409 *with* ``url``, which ``exist_ok=True`` accepts."""
        request = self._json_body(body)
        name, namespace = request.get("name"), request.get("organization") or USER
        if request.get("type", "model") not in (None, "model"):
            raise HubError(400, f"this test server holds model repos only, not {request.get('type')!r}")
        for part in (namespace, name):
            if not isinstance(part, str) or not _NAME.match(part):
                raise HubError(400, f"invalid repo name {namespace}/{name}: use letters, digits, '.', '_', '-'")
        repo_id = f"{namespace}/{name}"
        url = f"{self.endpoint}/{repo_id}"
        private = bool(request.get("private")) or request.get("visibility") == "private"
        if not self.store.create(repo_id, private):
            raise HubError(409, "You already created this model repo", extra={"url": url})
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def api_validate_yaml(self, body: bytes) -> None:
        """The client validates a model card's YAML header before every commit that holds ``README.md``; the YAML
        itself is checked by the tests that read the card back."""
        self._json_body(body)
        self._json({"errors": [], "warnings": []})

    def api_whoami(self, body: bytes) -> None:
        self._json({"type": "user", "name": USER, "fullname": "Test user", "orgs": [], "auth": {}})

    def api_preupload(self, body: bytes, repo: str, rev: str) -> None:
        """Every file is ``regular``: its content then travels base64 inside the commit. (``lfs`` would make the
        client fetch a Xet token, with no fallback.) ``oid`` of an existing file lets the client leave out
        unchanged files, so a second push commits only what changed."""
        files = self.store.resolve(repo, rev).files
        answer = []
        for item in self._json_body(body).get("files", []):
            entry = {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False}
            if item["path"] in files:
                entry["oid"] = files[item["path"]][0]
            answer.append(entry)
        self._json({"files": answer})

    def api_commit(self, body: bytes, repo: str, rev: str) -> None:
        """The ndjson commit: a ``header`` line, then ``file`` / ``deletedFile`` / ``deletedFolder`` lines."""
        if self.query.get("create_pr"):
            raise HubError(400, "this test server does not support pull requests (create_pr)")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "a commit starts with a 'header' line")
        oid = self.store.commit(repo, rev, lines[0]["value"], [(line["key"], line["value"]) for line in lines[1:]])
        self._json({"commitUrl": f"{self.endpoint}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    def api_create_branch(self, body: bytes, repo: str, branch: str) -> None:
        """``push_to_hub(revision=...)`` and ``create_branch`` (409 if it exists, tolerated with ``exist_ok``)."""
        self.store.create_branch(repo, branch, self._json_body(body).get("startingPoint"))
        self._json({})

    # ---- download -----------------------------------------------------------------------------------------------

    def api_refs(self, body: bytes, repo: str) -> None:
        branches = self.store.repo(repo).branches
        refs = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in sorted(branches.items())]
        self._json({"branches": refs, "converts": [], "tags": [], "pullRequests": []})

    def api_model_info(self, body: bytes, repo: str, rev: str | None = None) -> None:
        """``model_info``: transformers resolves ``sha`` here first, then downloads every file by that commit id."""
        commit = self.store.resolve(repo, rev or "main")
        self._json(
            {
                "id": repo,
                "modelId": repo,
                "sha": commit.oid,
                "private": self.store.repo(repo).private,
                "lastModified": commit.date,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            }
        )

    def api_tree(self, body: bytes, repo: str, rev: str, path: str | None = None) -> None:
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._json(tree_listing(self.store.resolve(repo, rev), path or "", recursive))

    def resolve(self, body: bytes, repo: str, rev: str, path: str) -> None:
        """A file's content (GET) or its metadata (HEAD). The client refuses a server whose answer lacks
        ``X-Repo-Commit`` (the commit id the revision resolved to: the snapshot folder's name) or ``ETag`` (the
        blob's cache key); ``Content-Length`` is checked against the bytes received."""
        commit = self.store.resolve(repo, rev)
        if path not in commit.files:
            raise HubError(404, f"{path} not found in {repo} at {commit.oid}", "EntryNotFound")
        oid, size = commit.files[path]
        data = self.store.read_blob(oid) if self.command == "GET" else b""
        self.send_response(200)
        for key, value in {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            "ETag": f'"{oid}"',
            "X-Repo-Commit": commit.oid,
        }.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: HubStore, verbose: bool = False):
        super().__init__(address, Handler)
        self.store, self.verbose = store, verbose


class HubServer:
    """The server on ``127.0.0.1`` on a free port, served from a thread; ``endpoint`` is the ``HF_ENDPOINT`` value.

    >>> with HubServer() as hub:
    ...     env = {"HF_ENDPOINT": hub.endpoint}
    """

    def __init__(self, root: str | Path | None = None, host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        self._tmp = tempfile.TemporaryDirectory(prefix="hub_server_") if root is None else None
        self.store = HubStore(root if root is not None else self._tmp.name)
        self.httpd = HubHTTPServer((host, port), self.store, verbose)
        host, port = self.httpd.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a small Hub API for offline push_to_hub/from_pretrained.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--root", default=None, help="folder for file contents (default: a temporary folder)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args()
    server = HubServer(args.root, args.host, args.port, args.verbose)
    print(
        f"Hub test server at {server.endpoint}: export HF_ENDPOINT={server.endpoint} (Ctrl-C stops; repos are kept "
        "in memory only)",
        flush=True,
    )
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
