"""A small Hugging Face Hub-compatible HTTP server for the test suite.

It speaks the subset of the Hub HTTP API that the *real* ``huggingface_hub`` 2.x client
(``HfApi``, ``hf_hub_download``, ``upload_folder``...) uses to create a repo, upload to it,
tag it and download from it, so that tests run the real client code end to end, offline.
Every route was checked against the installed client source (``huggingface_hub`` 2.4.0,
``hf_xet`` 1.8.0); each handler below names the client call that uses it.

Binds 127.0.0.1 on a free port, never any other address. Standard library only, with two
optional, lazily imported exceptions: ``hf_xet`` (see "Xet" below), and PyYAML, which reads a
README's whole YAML front matter into ``cardData`` as the Hub does (nested mappings such as a
dataset card's ``dataset_info`` included); without it only top-level keys are read.

Usage::

    server = HubServer(cas_dir=tmp_path / "cas")
    server.start()                      # or: with HubServer(...) as server:
    api = HfApi(endpoint=server.url, token=TEST_TOKEN)
    ...
    server.stop()

Storage model
-------------
A repo is a set of branches and tags pointing at commits; a commit holds a full snapshot
(``{path: FileEntry}``) and its parent. Creating a repo makes an "initial commit" holding a
``.gitattributes`` file, like the Hub does (so ``list_repo_files`` of a fresh repo is
``[".gitattributes"]`` and a fresh repo has 1 commit).

Small text files are "regular" (their bytes travel base64-encoded inside the commit
request). Files whose name matches the LFS patterns of ``.gitattributes`` (``*.safetensors``,
``*.bin``, ``*.pt``...), whose first 512 bytes contain a NUL byte, or that are at least
``lfs_threshold`` bytes (10 MB by default, as on the Hub) are "lfs": the client uploads
their bytes first, then the commit only carries ``{oid: sha256, size}``.

Large files: LFS vs Xet
-----------------------
The client (``_commit_api._upload_files``) picks the transport by itself, with no
negotiation with the server: Xet whenever ``hf_xet`` is importable and
``constants.HF_HUB_DISABLE_XET`` is false, else the git-LFS batch API.

* **LFS** (``HF_HUB_DISABLE_XET=1``): ``POST /{repo}.git/info/lfs/objects/batch`` answers
  an upload action whose ``href`` is a ``PUT /_lfs/{sha256}?sig=...`` URL on this server
  (the client sends no Authorization header to it, so the URL carries a one-off signature),
  plus a ``verify`` action. The PUT handler checks the sha256 and size of the body and keeps
  the bytes. Objects already stored come back without ``actions`` (the client then skips
  the PUT, as with the real Hub). Downloads serve the stored bytes.
* **Xet** (default when ``hf_xet`` is installed): the client asks
  ``GET /api/models/{repo}/xet-write-token/{rev}``; the reply
  ``{"accessToken", "exp", "casUrl": "local://<cas_dir>"}`` makes ``hf_xet`` write xorbs and
  shards into ``<cas_dir>/xet/xorbs/`` on the local disk, never talking to this server
  again. The commit then carries a plain ``lfsFile`` line with the **sha256** (computed by
  hf_xet while chunking) and the size: the Xet hash is *not* sent. The server recovers it
  by parsing the shard files (``*.mdb``) in the CAS folder: each file record there holds the
  Xet file hash, its segments (sizes) and a metadata extension holding the sha256 (layout
  found by experiment, see ``_parse_shard``). A commit naming a sha256 that is neither an
  uploaded LFS object, nor in a shard, nor already in the repo is refused (400), like the
  Hub refuses a pointer to a missing object.

  Downloads of Xet files work both ways: ``HEAD /resolve`` sends ``X-Xet-Hash`` and a
  ``Link: <.../xet-read-token/{commit}>; rel="xet-auth"`` header, so a client with hf_xet
  downloads through hf_xet straight from the local CAS (``xet-read-token`` answers with the
  ``X-Xet-*`` headers the Python side reads and the JSON body the Rust side reads). A plain
  HTTP GET (client with ``HF_HUB_DISABLE_XET=1``) gets the bytes too: the server rebuilds
  them from the local CAS with ``hf_xet`` (imported lazily, only for that; without
  ``hf_xet`` the GET answers 501 and listings, sizes and sha256 stay correct).

Auth
----
Tokens map to a user (name, orgs with a role, token role). Missing token on a write route
or on ``whoami``: 401. Unknown token anywhere: 401 ``Invalid credentials in Authorization
header`` (the message the client special-cases). Read-only token, or a namespace the user
is not a ``write``/``admin`` member of: 403. Private repos are invisible (404 / 401
``RepoNotFound``) to anyone outside their namespace.

Faults, log and inspection
--------------------------
``inject()`` answers a status to the next N matching requests, ``interrupt()`` drops the
connection after N bytes of a request body (or right after processing it, the response
lost), ``requests`` is the log (no Authorization header), and ``repo_exists``,
``is_private``, ``commits``, ``files``, ``file_bytes``, ``tags``, ``branches``, ``find_bytes``
inspect the state. Tests can pre-create repos with ``add_repo``.

Not implemented: pull requests (``create_pr``), gated repos, pagination (everything comes
in one page), multipart LFS, ``expand`` details beyond ``lastCommit``, datasets-server,
Spaces runtime, collections, discussions.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

# --------------------------------------------------------------------------------------
# Test identities
# --------------------------------------------------------------------------------------

TEST_USER = "alice"
TEST_ORG = "alignpress-test"
TEST_TOKEN = "hf_testAliceWriteToken0000000000000"
READ_TOKEN = "hf_testAliceReadToken00000000000000"
OTHER_USER = "bob"
OTHER_TOKEN = "hf_testBobWriteToken000000000000000"
INVALID_TOKEN = "hf_testInvalidToken0000000000000000"

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's threshold for "large" files

# Patterns tracked by git-LFS in the .gitattributes of a fresh repo (a subset of the Hub's).
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5",
    "*.joblib", "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx",
    "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar",
    "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst",
    "*tfevents*",
)
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_OID_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file stored in git in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    orgs: dict[str, str] = field(default_factory=dict)  # org name -> "admin" | "write" | "read"
    token_role: str = "write"  # "write" | "read" | "fineGrained"
    # fineGrained: the scopes whoami reports, [{"entity": {"type": "user"|"org"|"model", "name"}, "permissions": [...]}]
    scoped: tuple = ()

    def can_write(self, namespace: str, repo_id: str | None = None) -> bool:
        if self.token_role == "fineGrained":
            granted = {(s["entity"]["type"], s["entity"]["name"]) for s in self.scoped if "repo.write" in s["permissions"]}
            if not granted & {("user", namespace), ("org", namespace), ("model", repo_id)}:
                return False
        elif self.token_role != "write":
            return False
        return namespace == self.name or self.orgs.get(namespace) in ("admin", "write")

    def can_read(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit snapshot."""

    path: str
    size: int
    blob_id: str  # git oid: of the content (regular) or of the LFS pointer (lfs)
    sha256: str | None = None  # set for LFS/Xet files
    xet_hash: str | None = None  # set when the bytes live in the Xet CAS
    content: bytes | None = None  # regular files only; LFS bytes live in the server blob store

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256 or "", self.size)) if self.is_lfs else 0


@dataclass(frozen=True)
class Commit:
    oid: str
    parents: tuple[str, ...]
    title: str
    message: str
    author: str
    date: float
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: float
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass
class RequestRecord:
    """One request seen by the server (the Authorization header is never recorded)."""

    method: str
    path: str  # as sent (percent-encoded), without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names, without "authorization"
    user: str | None  # user the token belongs to, if any
    route: str | None  # handler name ("commit", "preupload", "lfs_batch", "lfs_put", "resolve"...)
    status: int | None = None  # None when the connection was dropped
    body_size: int = 0
    fault: str | None = None  # "inject" or "interrupt" when a fault answered it


@dataclass
class Fault:
    """A fault armed by ``HubServer.inject`` or ``HubServer.interrupt``."""

    kind: str  # "status" | "interrupt"
    method: str | None
    pattern: re.Pattern
    times: int | None  # None: forever
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    message: str = ""
    after_bytes: int = 0
    process: bool = False
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method not in (None, "*") and self.method.upper() != method:
            return False
        return self.pattern.search(path) is not None

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times


class HubError(Exception):
    """An error answer: JSON ``{"error": message}`` plus the X-Error-* headers the client reads."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, body=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def _json(obj: Any, status: int = 200, headers: dict | None = None, content_type="application/json") -> _Response:
    return _Response(status, json.dumps(obj).encode(), dict(headers or {}), content_type)


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case keys
    body: bytes
    match: re.Match
    user: User | None
    token_invalid: bool

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in ("1", "true", "yes")

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err


# --------------------------------------------------------------------------------------
# Xet shard parsing (local CAS written by hf_xet)
# --------------------------------------------------------------------------------------

_MDB_ENTRY = 48  # every record of an MDB shard is 48 bytes
_FLAG_VERIFICATION = 1 << 31
_FLAG_METADATA_EXT = 1 << 30


def _merkle_hex(raw: bytes) -> str:
    """Xet hashes are 4 little-endian u64 words, printed word by word as 16 hex digits."""
    return "".join(f"{w:016x}" for w in struct.unpack("<4Q", raw))


def _parse_shard(data: bytes) -> list[tuple[str, int, str | None]]:
    """Return ``(xet_hash, size, sha256)`` for each file record of an hf_xet MDB shard.

    Layout (found by experiment on hf_xet 1.8.0, every record 48 bytes): a 48-byte header,
    then per file a header ``hash[32] flags:u32 n:u32 pad[8]``, ``n`` segment records
    ``xorb_hash[32] flags:u32 bytes:u32 chunk_start:u32 chunk_end:u32``, ``n`` verification
    records if flag bit 31, one metadata record ``sha256[32] pad[16]`` if flag bit 30; the
    file section ends with a record whose hash is all 0xff.
    """
    out: list[tuple[str, int, str | None]] = []
    pos = _MDB_ENTRY
    while pos + _MDB_ENTRY <= len(data):
        raw_hash = data[pos : pos + 32]
        if raw_hash == b"\xff" * 32:
            break
        flags, n = struct.unpack_from("<II", data, pos + 32)
        pos += _MDB_ENTRY
        size = 0
        for i in range(n):
            (seg_bytes,) = struct.unpack_from("<I", data, pos + i * _MDB_ENTRY + 36)
            size += seg_bytes
        pos += n * _MDB_ENTRY
        if flags & _FLAG_VERIFICATION:
            pos += n * _MDB_ENTRY
        sha256 = None
        if flags & _FLAG_METADATA_EXT:
            sha256 = _merkle_hex(data[pos : pos + 32])
            pos += _MDB_ENTRY
        out.append((_merkle_hex(raw_hash), size, sha256))
    return out


# --------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a kept-alive connection may stay idle
    server_version = "hubserver/1"

    def setup(self) -> None:
        super().setup()
        self.server.hub._track(self.connection, add=True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.hub._track(self.connection, add=False)  # type: ignore[attr-defined]

    def _handle(self) -> None:
        self.server.hub._serve(self)  # type: ignore[attr-defined]

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------


class HubServer:
    """Hub-compatible HTTP server on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        cas_dir: str | os.PathLike | None = None,
        *,
        lfs_threshold: int = LFS_THRESHOLD,
        advertise_xet: bool = True,
        default_users: bool = True,
    ) -> None:
        self._own_cas = cas_dir is None
        self.cas_dir = Path(cas_dir) if cas_dir is not None else Path(tempfile.mkdtemp(prefix="hubserver-cas-"))
        self.cas_dir.mkdir(parents=True, exist_ok=True)
        self.lfs_threshold = lfs_threshold
        self.advertise_xet = advertise_xet  # send X-Xet-Hash on resolve for Xet-stored files
        self._lock = threading.RLock()
        self._tokens: dict[str, User] = {}
        self._repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 -> bytes (LFS uploads, rebuilt Xet files)
        self._upload_sigs: dict[str, tuple[str, int]] = {}  # sig -> (sha256, size) for LFS PUT urls
        self._xet_index: dict[str, tuple[str, int]] = {}  # sha256 -> (xet_hash, size)
        self._xet_seen: dict[str, float] = {}  # shard path -> mtime already parsed
        self._faults: list[Fault] = []
        self._log: list[RequestRecord] = []
        self._conns: set[socket.socket] = set()
        self._counter = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._xet_session = None
        self._xet_lock = threading.Lock()
        if default_users:
            self.add_token(TEST_TOKEN, TEST_USER, orgs={TEST_ORG: "write"})
            self.add_token(READ_TOKEN, TEST_USER, orgs={TEST_ORG: "write"}, role="read")
            self.add_token(OTHER_TOKEN, OTHER_USER)
        self._routes: list[tuple[str, re.Pattern, str, Callable[[_Request], _Response]]] = []
        self._register_routes()

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def start(self, port: int = 0) -> HubServer:
        """Serve on 127.0.0.1:``port`` (0: a free port) from a background thread."""
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hubserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # kept-alive client connections: close them so no handler thread lingers
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        with self._xet_lock:
            self._xet_session = None
        if self._own_cas:
            import shutil

            shutil.rmtree(self.cas_dir, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # ---------------------------------------------------------------- users and repos (test setup)

    def add_token(self, token: str, user: str, *, orgs: dict[str, str] | None = None, role: str = "write", scoped: list | None = None) -> None:
        """Make ``token`` valid for ``user``; ``orgs`` maps org name -> role ("admin"/"write"/"read");
        ``scoped``: a fine-grained token's scopes (role "fineGrained"), as whoami reports them."""
        with self._lock:
            self._tokens[token] = User(user, dict(orgs or {}), role, tuple(scoped or ()))

    def add_repo(
        self,
        repo_id: str,
        *,
        private: bool = False,
        repo_type: str = "model",
        files: dict[str, bytes] | None = None,
        author: str = TEST_USER,
    ) -> Repo:
        """Create a repo directly (no HTTP, no permission check), optionally with a first commit of ``files``."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            repo = self._create_repo(repo_id, repo_type, private, author)
            if files:
                snapshot = dict(repo.commits[repo.branches["main"]].files)
                for path, data in files.items():
                    if self._is_lfs(path, len(data), data[:512]):
                        sha = hashlib.sha256(data).hexdigest()
                        self._blobs[sha] = data
                        snapshot[path] = FileEntry(path, len(data), git_blob_oid(lfs_pointer(sha, len(data))), sha)
                    else:
                        snapshot[path] = FileEntry(path, len(data), git_blob_oid(data), content=data)
                self._new_commit(repo, "main", "Add files", "", author, snapshot)
            return repo

    # ---------------------------------------------------------------- fault injection

    def inject(
        self,
        method: str | None,
        path_regex: str,
        status: int,
        *,
        times: int | None = 1,
        headers: dict[str, str] | None = None,
        message: str | None = None,
    ) -> Fault:
        """Answer ``status`` to the next ``times`` requests (None: all) whose method and path match.

        ``path_regex`` is searched (``re.search``) in the request path as sent, without the query
        string, e.g. ``r"/commit/"``, ``r"^/api/whoami-v2$"``, ``r"/_lfs/"``. ``method`` is
        "GET", "POST"... or None / "*" for any. A 429 or 503 gets ``Retry-After: 0`` unless
        ``headers`` says otherwise (the client still sleeps 1 s: it adds 1 to Retry-After,
        utils/_http.py ``_http_backoff_base``). The request body is read and discarded, nothing
        changes on the server. Returns the ``Fault``; its ``hits`` counts the answered requests.
        """
        hdrs = {"Retry-After": "0"} if status in (429, 503) else {}
        hdrs.update(headers or {})
        fault = Fault(
            "status", method, re.compile(path_regex), times, status=status, headers=hdrs,
            message=message or f"Injected fault: HTTP {status}",
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def interrupt(
        self,
        method: str | None,
        path_regex: str,
        *,
        after_bytes: int = 0,
        times: int | None = 1,
        process: bool = False,
    ) -> Fault:
        """Drop the connection of the next ``times`` matching requests, without any answer.

        By default the server reads ``after_bytes`` bytes of the request body (or all of it
        if shorter) and closes the connection: an upload cut off mid-way, nothing stored.
        With ``process=True`` the request is fully handled first (e.g. the commit *is*
        created) and only the answer is lost. The client sees a connection error; note that
        ``http_backoff`` callers (preupload, LFS batch, LFS PUT) retry network errors, while
        the commit POST (``get_session().post``) does not.
        """
        fault = Fault("interrupt", method, re.compile(path_regex), times, after_bytes=after_bytes, process=process)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # ---------------------------------------------------------------- request log

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    def requests_to(self, route: str | None = None, *, method: str | None = None, path_regex: str | None = None):
        """Requests filtered by route name (e.g. "commit"), method and/or path regex."""
        return [
            r
            for r in self.requests
            if (route is None or r.route == route)
            and (method is None or r.method == method.upper())
            and (path_regex is None or re.search(path_regex, r.path))
        ]

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # ---------------------------------------------------------------- inspection

    def _repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            try:
                return self._repos[(repo_type, repo_id)]
            except KeyError:
                raise KeyError(f"no {repo_type} repo {repo_id!r}") from None

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        return self._repo(repo_id, repo_type).private

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        with self._lock:
            return sorted(rid for (rtype, rid) in self._repos if rtype == repo_type)

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """History of ``revision``, **oldest first** (index 0 is the "initial commit")."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            oid: str | None = self._resolve_rev(repo, revision)
            chain = []
            while oid is not None:
                commit = repo.commits[oid]
                chain.append(commit)
                oid = commit.parents[0] if commit.parents else None
            return chain[::-1]

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self._resolve_rev(self._repo(repo_id, repo_type), revision)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, int]:
        """``{path: size}`` at ``revision`` (branch, tag or commit oid)."""
        return {p: e.size for p, e in self.file_entries(repo_id, revision, repo_type).items()}

    def file_entries(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, FileEntry]:
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return dict(repo.commits[self._resolve_rev(repo, revision)].files)

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        entry = self.file_entries(repo_id, revision, repo_type)[path]
        return self._entry_bytes(entry)

    def tags(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._repo(repo_id, repo_type).tags)

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._repo(repo_id, repo_type).branches)

    def set_private(self, repo_id: str, private: bool, repo_type: str = "model") -> None:
        with self._lock:
            self._repo(repo_id, repo_type).private = private

    def find_bytes(self, needle: bytes | str) -> list[str]:
        """Where ``needle`` occurs in stored content: every file of every commit of every repo
        (Xet files rebuilt from the CAS), commit titles and messages, and LFS objects uploaded
        but never committed. Returns locations like ``"model:alice/x@<oid8>:path"``; use it to
        prove a token was uploaded nowhere."""
        if isinstance(needle, str):
            needle = needle.encode()
        hits: list[str] = []
        with self._lock:
            repos = list(self._repos.values())
            committed: set[str] = set()
        for repo in repos:
            for commit in list(repo.commits.values()):
                where = f"{repo.repo_type}:{repo.repo_id}@{commit.oid[:8]}"
                if needle in commit.title.encode() or needle in commit.message.encode():
                    hits.append(f"{where}:<commit message>")
                for entry in commit.files.values():
                    if entry.sha256:
                        committed.add(entry.sha256)
                    if needle in self._entry_bytes(entry):
                        hits.append(f"{where}:{entry.path}")
        with self._lock:
            loose = [(sha, data) for sha, data in self._blobs.items() if sha not in committed]
        hits.extend(f"<uncommitted lfs object {sha}>" for sha, data in loose if needle in data)
        return hits

    # ---------------------------------------------------------------- internals: state

    def _create_repo(self, repo_id: str, repo_type: str, private: bool, author: str) -> Repo:
        repo = Repo(repo_id, repo_type, private, time.time())
        self._repos[(repo_type, repo_id)] = repo
        attrs = FileEntry(".gitattributes", len(GITATTRIBUTES), git_blob_oid(GITATTRIBUTES), content=GITATTRIBUTES)
        self._new_commit(repo, "main", "initial commit", "", author, {".gitattributes": attrs})
        return repo

    def _new_commit(self, repo: Repo, branch: str, title: str, message: str, author: str, files) -> Commit:
        self._counter += 1
        parent = repo.branches.get(branch)
        seed = f"{repo.repo_id}\n{parent}\n{title}\n{time.time_ns()}\n{self._counter}\n"
        seed += "\n".join(f"{p}:{e.blob_id}" for p, e in sorted(files.items()))
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid, (parent,) if parent else (), title, message, author, time.time(), dict(files))
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def _resolve_rev(self, repo: Repo, revision: str) -> str:
        """Branch, tag, ``refs/heads/x``, ``refs/tags/x`` or full commit oid -> commit oid."""
        rev = revision
        if rev.startswith("refs/heads/"):
            return self._lookup(repo.branches, rev[len("refs/heads/") :], revision)
        if rev.startswith("refs/tags/"):
            return self._lookup(repo.tags, rev[len("refs/tags/") :], revision)
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        if _OID_RE.match(rev) and rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    @staticmethod
    def _lookup(refs: dict[str, str], name: str, revision: str) -> str:
        if name not in refs:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return refs[name]

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in LFS_PATTERNS):
            return True
        return size >= self.lfs_threshold or b"\0" in sample

    # ---------------------------------------------------------------- internals: xet

    def _refresh_xet_index(self) -> None:
        """Parse shard files hf_xet wrote into the local CAS that were not parsed yet."""
        for shard in self.cas_dir.rglob("*.mdb"):
            try:
                mtime = shard.stat().st_mtime
                if self._xet_seen.get(str(shard)) == mtime:
                    continue
                records = _parse_shard(shard.read_bytes())
            except (OSError, struct.error):
                continue
            self._xet_seen[str(shard)] = mtime
            for xet_hash, size, sha256 in records:
                if sha256:
                    self._xet_index[sha256] = (xet_hash, size)

    def _xet_lookup(self, sha256: str) -> tuple[str, int] | None:
        with self._lock:
            if sha256 not in self._xet_index:
                self._refresh_xet_index()
            return self._xet_index.get(sha256)

    def _entry_bytes(self, entry: FileEntry) -> bytes:
        if not entry.is_lfs:
            return entry.content or b""
        with self._lock:
            data = self._blobs.get(entry.sha256)
        if data is not None:
            return data
        if entry.xet_hash is None:
            raise HubError(500, f"LFS object {entry.sha256} is missing")
        data = self._xet_rebuild(entry.xet_hash, entry.size)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise HubError(500, f"Xet reconstruction of {entry.path} does not match its sha256")
        with self._lock:
            self._blobs[entry.sha256] = data
        return data

    def _xet_rebuild(self, xet_hash: str, size: int) -> bytes:
        """Rebuild a file's bytes from the local CAS with hf_xet (optional dependency)."""
        try:
            import hf_xet
        except ImportError as err:
            raise HubError(501, "hf_xet is not installed: cannot serve Xet-stored bytes over HTTP") from err
        with self._xet_lock:
            if self._xet_session is None:
                self._xet_session = hf_xet.XetSession()
            session = self._xet_session
        exp = int(time.time()) + 3600
        group = session.new_download_stream_group(
            endpoint=f"local://{self.cas_dir}", token="hubserver-local", token_expiry_unix_secs=exp
        )
        try:
            return b"".join(group.download_stream(hf_xet.XetFileInfo(xet_hash, size)))
        finally:
            try:
                group.finish()
            except Exception:  # noqa: BLE001 - telemetry bookkeeping only
                pass

    def _xet_token_response(self) -> _Response:
        exp = int(time.time()) + 3600
        cas_url = f"local://{self.cas_dir}"
        token = "xet-" + secrets.token_hex(8)
        headers = {"X-Xet-Cas-Url": cas_url, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(exp)}
        return _json({"accessToken": token, "exp": exp, "casUrl": cas_url}, headers=headers)

    # ---------------------------------------------------------------- internals: HTTP

    def _serve(self, h: _Handler) -> None:
        method = h.command
        split = urlsplit(h.path)
        path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        headers = {k.lower(): v for k, v in h.headers.items()}
        logged = {k: v for k, v in headers.items() if k != "authorization"}

        # Authorization (never logged)
        user: User | None = None
        token_invalid = False
        auth = headers.get("authorization", "")
        if auth:
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
            with self._lock:
                user = self._tokens.get(token)
            token_invalid = user is None

        route_name, handler, match = None, None, None
        for r_method, pattern, name, fn in self._routes:
            m = pattern.match(path)
            if m and (r_method == method or (r_method == "GET" and method == "HEAD")):
                route_name, handler, match = name, fn, m
                break

        record = RequestRecord(method, path, query, logged, user.name if user else None, route_name)
        with self._lock:
            self._log.append(record)
            fault = next((f for f in self._faults if f.matches(method, path)), None)
            if fault is not None:
                fault.hits += 1
                record.fault = "inject" if fault.kind == "status" else "interrupt"

        if fault is not None and fault.kind == "interrupt" and not fault.process:
            try:
                record.body_size = len(self._read_body(h, limit=fault.after_bytes))
            except (OSError, ValueError):
                pass
            self._drop(h)
            return

        try:
            body = self._read_body(h)
        except (OSError, ValueError):
            self._drop(h)
            return
        record.body_size = len(body)

        if fault is not None and fault.kind == "status":
            err = HubError(fault.status, fault.message, headers=fault.headers)
            self._send(h, record, self._error_response(err))
            return

        try:
            if handler is None:
                raise HubError(404, f"hubserver: no route for {method} {path}")
            req = _Request(method, path, query, headers, body, match, user, token_invalid)
            if token_invalid and route_name not in ("lfs_put",):
                # The Hub rejects an unknown token on every route, even public reads.
                raise HubError(401, "Invalid credentials in Authorization header")
            response = handler(req)
        except HubError as err:
            response = self._error_response(err)
        except Exception as err:  # noqa: BLE001 - surface server bugs as 500s
            response = self._error_response(HubError(500, f"hubserver internal error: {err!r}"))

        if fault is not None and fault.kind == "interrupt":  # process=True: handled, answer lost
            self._drop(h)
            return
        self._send(h, record, response)

    @staticmethod
    def _error_response(err: HubError) -> _Response:
        body = err.body if err.body is not None else {"error": err.message}
        headers = {"X-Error-Message": err.message.replace("\n", " ")[:500]}
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.update(err.headers)
        return _json(body, err.status, headers)

    @staticmethod
    def _read_body(h: _Handler, limit: int | None = None) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            total = 0
            while True:
                line = h.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunk = h.rfile.read(size)
                h.rfile.readline(65537)
                chunks.append(chunk)
                total += len(chunk)
                if limit is not None and total >= limit:
                    break
            data = b"".join(chunks)
            return data if limit is None else data[:limit]
        length = int(h.headers.get("Content-Length") or 0)
        if limit is not None:
            length = min(length, limit)
        return h.rfile.read(length) if length else b""

    @staticmethod
    def _drop(h: _Handler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, h: _Handler, record: RequestRecord, resp: _Response) -> None:
        record.status = resp.status
        try:
            h.send_response(resp.status)
            h.send_header("Content-Type", resp.content_type)
            if "Content-Length" not in resp.headers:  # HEAD on resolve sets the size of the file itself
                h.send_header("Content-Length", str(len(resp.body)))
            for key, value in resp.headers.items():
                h.send_header(key, value)
            h.send_header("X-Request-Id", f"hubserver-{id(record):x}")
            h.end_headers()
            if h.command != "HEAD" and resp.body:
                h.wfile.write(resp.body)
            h.wfile.flush()
        except OSError:
            h.close_connection = True

    # ---------------------------------------------------------------- internals: access control

    def _require_user(self, req: _Request) -> User:
        if req.user is None:
            raise HubError(401, "You must be authenticated to access this resource (no token in Authorization header)")
        return req.user

    def _get_repo(self, req: _Request, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        """Repo visible to the caller (404/401 RepoNotFound otherwise), writable if ``write``."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        visible = repo is not None and (
            not repo.private or (req.user is not None and req.user.can_read(repo.namespace))
        )
        if not visible:
            status = 401 if req.user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        if write:
            user = self._require_user(req)
            if not user.can_write(repo.namespace, repo.repo_id):
                raise HubError(
                    403, f"You don't have the rights to write to {repo_type} {repo_id} (token role: {user.token_role})"
                )
        return repo

    # ---------------------------------------------------------------- routes

    def _register_routes(self) -> None:
        api = r"^/api/(?P<type>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
        git = r"^/(?:(?P<type>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects"
        add = lambda method, regex, name, fn: self._routes.append((method, re.compile(regex), name, fn))  # noqa: E731
        add("GET", r"^/api/whoami-v2$", "whoami", self._r_whoami)
        add("POST", r"^/api/repos/create$", "create_repo", self._r_create_repo)
        add("DELETE", r"^/api/repos/delete$", "delete_repo", self._r_delete_repo)
        add("POST", r"^/api/validate-yaml$", "validate_yaml", self._r_validate_yaml)
        add("POST", api + r"/preupload/(?P<rev>[^/]+)$", "preupload", self._r_preupload)
        add("POST", api + r"/commit/(?P<rev>[^/]+)$", "commit", self._r_commit)
        add("GET", api + r"/xet-(?P<kind>read|write)-token/(?P<rev>[^/]+)$", "xet_token", self._r_xet_token)
        add("POST", api + r"/tag/(?P<rev>[^/]+)$", "create_tag", self._r_create_tag)
        add("DELETE", api + r"/tag/(?P<tag>[^/]+)$", "delete_tag", self._r_delete_tag)
        add("POST", api + r"/branch/(?P<branch>[^/]+)$", "create_branch", self._r_create_branch)
        add("DELETE", api + r"/branch/(?P<branch>[^/]+)$", "delete_branch", self._r_delete_branch)
        add("GET", api + r"/refs$", "refs", self._r_refs)
        add("GET", api + r"/commits/(?P<rev>[^/]+)$", "commits", self._r_commits)
        add("GET", api + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "tree", self._r_tree)
        add("POST", api + r"/paths-info/(?P<rev>[^/]+)$", "paths_info", self._r_paths_info)
        add("PUT", api + r"/settings$", "settings", self._r_settings)
        add("GET", api + r"/revision/(?P<rev>[^/]+)$", "repo_info", self._r_repo_info)
        add("GET", api + r"$", "repo_info", self._r_repo_info)
        add("POST", git + r"/batch$", "lfs_batch", self._r_lfs_batch)
        add("POST", git + r"/verify$", "lfs_verify", self._r_lfs_verify)
        add("PUT", r"^/_lfs/(?P<oid>[0-9a-f]{64})$", "lfs_put", self._r_lfs_put)
        add(
            "GET",
            r"^/(?:(?P<type>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$",
            "resolve",
            self._r_resolve,
        )

    @staticmethod
    def _target(req: _Request) -> tuple[str, str]:
        """(repo_type, repo_id) from the route's ``type``/``ns``/``name`` groups."""
        g = req.match.groupdict()
        repo_type = _REPO_TYPES[g["type"]] if g.get("type") else "model"
        return repo_type, f"{unquote(g['ns'])}/{unquote(g['name'])}"

    # GET /api/whoami-v2 -- HfApi.whoami()
    def _r_whoami(self, req: _Request) -> _Response:
        user = self._require_user(req)
        orgs = [
            {"type": "org", "name": org, "fullname": org, "roleInOrg": role, "id": hashlib.md5(org.encode()).hexdigest()[:24]}
            for org, role in sorted(user.orgs.items())
        ]
        return _json(
            {
                "type": "user",
                "id": hashlib.md5(user.name.encode()).hexdigest()[:24],
                "name": user.name,
                "fullname": user.name.title(),
                "email": f"{user.name}@example.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "orgs": orgs,
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "hubserver-test", "role": user.token_role,
                                    **({"fineGrained": {"canReadGatedRepos": True, "global": [], "scoped": list(user.scoped)}}
                                       if user.token_role == "fineGrained" else {})},
                },
            }
        )

    # POST /api/repos/create -- HfApi.create_repo(); body {name, organization, type?, visibility?|private?}
    def _r_create_repo(self, req: _Request) -> _Response:
        user = self._require_user(req)
        body = req.json()
        name = body.get("name") or ""
        namespace = body.get("organization") or user.name
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not _NAME_RE.match(name) or "--" in name or ".." in name or name.endswith((".git", ".")):
            raise HubError(400, f"Invalid repo name: {name!r}")
        if not user.can_write(namespace):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace \"{namespace}\"")
        if "visibility" in body:
            private = body["visibility"] != "public"
        else:
            private = bool(body.get("private", False))
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubError(409, f"You already created this {repo_type} repo", body={"error": f"You already created this {repo_type} repo", "url": url})
            self._create_repo(repo_id, repo_type, private, user.name)
        return _json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    # DELETE /api/repos/delete -- HfApi.delete_repo(); body {name, organization, type?}
    def _r_delete_repo(self, req: _Request) -> _Response:
        user = self._require_user(req)
        body = req.json()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or user.name}/{body.get('name')}"
        self._get_repo(req, repo_type, repo_id, write=True)
        with self._lock:
            del self._repos[(repo_type, repo_id)]
        return _json({})

    # PUT /api/{type}s/{repo}/settings -- HfApi.update_repo_settings(private=/visibility=)
    def _r_settings(self, req: _Request) -> _Response:
        repo = self._get_repo(req, *self._target(req), write=True)
        body = req.json()
        with self._lock:
            if "visibility" in body:
                repo.private = body["visibility"] != "public"
            elif "private" in body:
                repo.private = bool(body["private"])
        return _json({})

    # POST /api/validate-yaml -- HfApi.create_commit() when README.md is committed (_validate_yaml)
    def _r_validate_yaml(self, req: _Request) -> _Response:
        content = str(req.json().get("content", ""))
        errors = _yaml_front_matter_errors(content)
        if errors:
            return _json({"errors": [{"message": e} for e in errors], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    # POST /api/{type}s/{repo}/preupload/{rev} -- create_commit/upload_folder (_fetch_upload_modes)
    def _r_preupload(self, req: _Request) -> _Response:
        repo = self._get_repo(req, *self._target(req), write=True)
        rev = unquote(req.match["rev"])
        with self._lock:
            head = self._resolve_rev(repo, rev) if rev in repo.branches else None
            if head is None and not req.flag("create_pr"):
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            snapshot = repo.commits[head].files if head else {}
        out = []
        for f in req.json().get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            mode = "lfs" if self._is_lfs(f["path"], int(f.get("size", 0)), sample) else "regular"
            existing = snapshot.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.is_lfs else existing.blob_id
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": out, "commitOid": head})

    # POST /{repo}.git/info/lfs/objects/batch -- upload with HF_HUB_DISABLE_XET=1 (lfs.post_lfs_batch_info)
    def _r_lfs_batch(self, req: _Request) -> _Response:
        repo_type, repo_id = self._target(req)
        self._get_repo(req, repo_type, repo_id, write=True)
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(400, "hubserver only implements the LFS 'upload' operation")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid", "")), int(obj.get("size", -1))
            item: dict[str, Any] = {"oid": oid, "size": size}
            if not _SHA256_RE.match(oid) or size < 0:
                item["error"] = {"code": 422, "message": "Invalid object id or size"}
            else:
                with self._lock:
                    stored = self._blobs.get(oid)
                    if stored is None or len(stored) != size:
                        sig = secrets.token_hex(16)
                        self._upload_sigs[sig] = (oid, size)
                        item["authenticated"] = True
                        item["actions"] = {
                            "upload": {"href": f"{self.url}/_lfs/{oid}?sig={sig}", "expires_in": 3600},
                            "verify": {
                                "href": f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify",
                                "expires_in": 3600,
                            },
                        }
            objects.append(item)
        return _json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    # PUT /_lfs/{sha256}?sig=... -- the "href" of the batch upload action (lfs._upload_single_part)
    def _r_lfs_put(self, req: _Request) -> _Response:
        oid = req.match["oid"]
        with self._lock:
            expected = self._upload_sigs.get(req.param("sig") or "")
        if expected is None or expected[0] != oid:
            raise HubError(403, "Invalid or missing upload signature")
        if len(req.body) != expected[1]:
            raise HubError(400, f"Size mismatch: expected {expected[1]} bytes, got {len(req.body)}")
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, "sha256 mismatch: the uploaded bytes do not match the object id")
        with self._lock:
            self._blobs[oid] = req.body
        return _Response(200, b"", {}, "text/plain")

    # POST /{repo}.git/info/lfs/objects/verify -- the batch "verify" action (lfs.lfs_upload step 3)
    def _r_lfs_verify(self, req: _Request) -> _Response:
        self._get_repo(req, *self._target(req), write=True)
        body = req.json()
        with self._lock:
            stored = self._blobs.get(str(body.get("oid")))
        if stored is None or len(stored) != body.get("size"):
            raise HubError(404, f"Object {body.get('oid')} not found or wrong size")
        return _json({"success": True})

    # GET /api/{type}s/{repo}/xet-{read|write}-token/{rev} -- hf_xet upload (token_refresh_url)
    # and file_download.xet_get (X-Xet-* headers); answers the JSON body and the headers.
    def _r_xet_token(self, req: _Request) -> _Response:
        write = req.match["kind"] == "write"
        self._get_repo(req, *self._target(req), write=write)
        return self._xet_token_response()

    # POST /api/{type}s/{repo}/commit/{rev} -- create_commit/upload_folder (_commit_api._send_commit)
    def _r_commit(self, req: _Request) -> _Response:
        repo = self._get_repo(req, *self._target(req), write=True)
        user = self._require_user(req)
        branch = unquote(req.match["rev"])
        if req.flag("create_pr"):
            raise HubError(400, "hubserver does not implement pull requests (create_pr)")
        try:
            lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, ValueError) as err:
            raise HubError(400, f"Invalid NDJSON commit payload: {err}") from err
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of the commit payload must be the header")
        header = lines[0].get("value", {})
        with self._lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.branches[branch]
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    data = base64.b64decode(value.get("content", "")) if value.get("encoding") == "base64" else value.get("content", "").encode()
                    files[path] = FileEntry(path, len(data), git_blob_oid(data), content=data)
                elif key == "lfsFile":
                    files[path] = self._lfs_entry(repo, path, str(value.get("oid", "")), value.get("size"))
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation: {key!r}")
            summary = header.get("summary") or ""
            commit = self._new_commit(repo, branch, summary, header.get("description") or "", user.name, files)
        url = f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}"
        return _json({"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None})

    def _lfs_entry(self, repo: Repo, path: str, sha256: str, size: Any) -> FileEntry:
        """FileEntry for an ``lfsFile`` commit line: the object must have been uploaded (LFS PUT or Xet)."""
        if not _SHA256_RE.match(sha256):
            raise HubError(400, f"Invalid LFS oid for {path}: {sha256!r}")
        xet = None
        if sha256 in self._blobs:
            known_size = len(self._blobs[sha256])
        elif (found := self._xet_lookup(sha256)) is not None:
            xet, known_size = found
        else:
            previous = next(
                (e for c in repo.commits.values() for e in c.files.values() if e.sha256 == sha256), None
            )
            if previous is None:
                raise HubError(
                    400,
                    f"Your push was rejected because an LFS pointer pointed to a file that does not exist: {path} ({sha256})",
                )
            xet, known_size = previous.xet_hash, previous.size
        if xet is None and (found := self._xet_lookup(sha256)) is not None:
            xet = found[0]
        if size is not None and int(size) != known_size:
            raise HubError(400, f"Size mismatch for {path}: commit says {size}, stored object has {known_size}")
        return FileEntry(path, known_size, git_blob_oid(lfs_pointer(sha256, known_size)), sha256, xet)

    # POST /api/{type}s/{repo}/tag/{rev} -- HfApi.create_tag(); body {tag, message?}
    def _r_create_tag(self, req: _Request) -> _Response:
        repo = self._get_repo(req, *self._target(req), write=True)
        tag = str(req.json().get("tag") or "")
        if not tag or not re.match(r"^[A-Za-z0-9._/-]+$", tag):
            raise HubError(400, f"Invalid tag name: {tag!r}")
        with self._lock:
            oid = self._resolve_rev(repo, unquote(req.match["rev"]))
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = oid
        return _json({})

    # DELETE /api/{type}s/{repo}/tag/{tag} -- HfApi.delete_tag()
    def _r_delete_tag(self, req: _Request) -> _Response:
        repo = self._get_repo(req, *self._target(req), write=True)
        tag = unquote(req.match["tag"])
        with self._lock:
            if tag not in repo.tags:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            del repo.tags[tag]
        return _json({})

    # POST /api/{type}s/{repo}/branch/{branch} -- HfApi.create_branch(); body {startingPoint?}
    def _r_create_branch(self, req: _Request) -> _Response:
        repo = self._get_repo(req, *self._target(req), write=True)
        branch = unquote(req.match["branch"])
        if not re.match(r"^[A-Za-z0-9._/-]+$", branch) or branch.startswith("refs/"):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        start = req.json().get("startingPoint")
        with self._lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self._resolve_rev(repo, start or "main")
        return _json({})

    # DELETE /api/{type}s/{repo}/branch/{branch} -- HfApi.delete_branch()
    def _r_delete_branch(self, req: _Request) -> _Response:
        repo = self._get_repo(req, *self._target(req), write=True)
        branch = unquote(req.match["branch"])
        with self._lock:
            if branch not in repo.branches or branch == "main":
                raise HubError(404 if branch not in repo.branches else 403, f"Cannot delete branch {branch}")
            del repo.branches[branch]
        return _json({})

    # GET /api/{type}s/{repo}/refs -- HfApi.list_repo_refs()
    def _r_refs(self, req: _Request) -> _Response:
        repo = self._get_repo(req, *self._target(req))
        with self._lock:
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in sorted(repo.branches.items())]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in sorted(repo.tags.items())]
        out: dict[str, Any] = {"branches": branches, "converts": [], "tags": tags}
        if req.flag("include_prs"):
            out["pullRequests"] = []
        return _json(out)

    # GET /api/{type}s/{repo}/commits/{rev} -- HfApi.list_repo_commits() (newest first)
    def _r_commits(self, req: _Request) -> _Response:
        repo_type, repo_id = self._target(req)
        self._get_repo(req, repo_type, repo_id)
        history = self.commits(repo_id, unquote(req.match["rev"]), repo_type)[::-1]
        return _json(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author, "avatar": ""}],
                    "date": _iso(c.date),
                    **({"formatted": {"title": c.title, "message": c.message}} if req.query.get("expand[]") else {}),
                }
                for c in history
            ]
        )

    def _snapshot(self, req: _Request) -> tuple[Repo, Commit]:
        repo = self._get_repo(req, *self._target(req))
        with self._lock:
            return repo, repo.commits[self._resolve_rev(repo, unquote(req.match["rev"]))]

    def _last_commit(self, repo: Repo, commit: Commit, path: str, is_dir: bool) -> dict:
        """The newest commit (from ``commit`` backwards) that changed ``path``."""

        def view(c: Commit):
            if not is_dir:
                e = c.files.get(path)
                return e.blob_id if e else None
            prefix = path + "/"
            return tuple(sorted((p, e.blob_id) for p, e in c.files.items() if p.startswith(prefix)))

        current = commit
        while current.parents:
            parent = repo.commits[current.parents[0]]
            if view(parent) != view(current):
                break
            current = parent
        return {"id": current.oid, "title": current.title, "date": _iso(current.date)}

    def _tree_item(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        entry = commit.files.get(path)
        if entry is None:  # a folder
            item: dict[str, Any] = {
                "type": "directory",
                "oid": hashlib.sha1(f"tree {commit.oid} {path}".encode()).hexdigest(),
                "size": 0,
                "path": path,
            }
        else:
            item = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
            if entry.is_lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
            if entry.xet_hash:
                item["xetHash"] = entry.xet_hash
        if expand:
            item["lastCommit"] = self._last_commit(repo, commit, path, entry is None)
        return item

    # GET /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=&expand= -- list_repo_tree(), list_repo_files()
    def _r_tree(self, req: _Request) -> _Response:
        repo, commit = self._snapshot(req)
        base = unquote(req.match["path"] or "").strip("/")
        recursive, expand = req.flag("recursive"), req.flag("expand")
        prefix = base + "/" if base else ""
        if base and base in commit.files:
            raise HubError(404, f"{base} is a file, not a folder", "EntryNotFound")
        below = [p for p in commit.files if p.startswith(prefix)]
        if base and not below:
            raise HubError(404, f"Path {base} not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        paths: set[str] = set()
        for p in below:
            parts = p[len(prefix) :].split("/")
            if recursive:
                paths.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            else:
                paths.add(prefix + parts[0])
        # Hub order: folders first, then files, each sorted by path
        ordered = sorted(paths, key=lambda p: (p in commit.files, p))
        return _json([self._tree_item(repo, commit, p, expand) for p in ordered])

    # POST /api/{type}s/{repo}/paths-info/{rev} (form: paths=..&expand=..) -- get_paths_info(), copies
    def _r_paths_info(self, req: _Request) -> _Response:
        repo, commit = self._snapshot(req)
        form = parse_qs(req.body.decode(), keep_blank_values=True)
        if req.headers.get("content-type", "").startswith("application/json"):
            body = req.json()
            form = {"paths": list(body.get("paths", [])), "expand": [str(body.get("expand", False))]}
        expand = (form.get("expand") or ["false"])[0].lower() in ("1", "true")
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files or any(p.startswith(path + "/") for p in commit.files):
                out.append(self._tree_item(repo, commit, path, expand))
        return _json(out)

    # GET /api/{type}s/{repo}[/revision/{rev}] -- HfApi.repo_info()/model_info() (blobs=True: files_metadata)
    def _r_repo_info(self, req: _Request) -> _Response:
        repo_type, repo_id = self._target(req)
        repo = self._get_repo(req, repo_type, repo_id)
        rev = unquote(req.match.groupdict().get("rev") or "main")
        with self._lock:
            commit = repo.commits[self._resolve_rev(repo, rev)]
        blobs = req.flag("blobs")
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib["size"] = entry.size
                sib["blobId"] = entry.blob_id
                if entry.is_lfs:
                    sib["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
            siblings.append(sib)
        card = None
        readme = commit.files.get("README.md")
        if readme is not None and not readme.is_lfs:
            card = _parse_front_matter(readme.content or b"")
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card.get("tags", [])) if card and isinstance(card.get("tags"), list) else [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if card is not None:
            info["cardData"] = card
        if repo_type == "model":
            info["modelId"] = repo_id
            if card and isinstance(card.get("library_name"), str):
                info["library_name"] = card["library_name"]
            if card and isinstance(card.get("pipeline_tag"), str):
                info["pipeline_tag"] = card["pipeline_tag"]
        return _json(info)

    # GET|HEAD /[{type}s/]{repo}/resolve/{rev}/{path} -- hf_hub_download(), get_hf_file_metadata()
    def _r_resolve(self, req: _Request) -> _Response:
        repo_type, repo_id = self._target(req)
        repo = self._get_repo(req, repo_type, repo_id)
        rev = unquote(req.match["rev"])
        path = unquote(req.match["path"])
        with self._lock:
            oid = self._resolve_rev(repo, rev)
            entry = repo.commits[oid].files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        headers = {"X-Repo-Commit": oid, "Accept-Ranges": "bytes"}
        if entry.is_lfs:
            etag = f'"{entry.sha256}"'
            headers.update({"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(entry.size)})
            if entry.xet_hash and self.advertise_xet:
                refresh = f"{self.url}/api/{repo_type}s/{repo_id}/xet-read-token/{oid}"
                headers["X-Xet-Hash"] = entry.xet_hash
                headers["Link"] = f'<{refresh}>; rel="xet-auth"'
        else:
            headers["ETag"] = f'"{entry.blob_id}"'
        content_type = "application/octet-stream"
        if req.method == "HEAD":
            headers["Content-Length"] = str(entry.size)
            return _Response(200, b"", headers, content_type)
        data = self._entry_bytes(entry)
        status = 200
        rng = req.headers.get("range", "")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
        if m:
            start = int(m[1])
            end = int(m[2]) if m[2] else len(data) - 1
            if start >= len(data) and len(data) > 0:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data = data[start : end + 1]
            status = 206
        return _Response(status, data, headers, content_type)


# --------------------------------------------------------------------------------------
# README front matter (a small YAML subset; the Hub validates much more)
# --------------------------------------------------------------------------------------


def _front_matter_lines(content: str) -> list[str] | None:
    lines = content.replace("\r\n", "\n").split("\n")
    if not lines or lines[0].strip() != "---":
        return None
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return lines[1:i]
    raise ValueError("metadata block opened with '---' is never closed")


# The licenses the Hub's metadata validation accepts, as its error message lists them (quoted in
# huggingface/huggingface_hub issue #4218, 2026-05-10, from huggingface_hub 1.14): the Hub refuses
# a README whose `license` is another value with `"license" must be one of [...]`.
HUB_LICENSES = (
    "apache-2.0, mit, openrail, bigscience-openrail-m, creativeml-openrail-m, bigscience-bloom-rail-1.0, bigcode-openrail-m, "
    "afl-3.0, artistic-2.0, bsl-1.0, bsd, bsd-2-clause, bsd-3-clause, bsd-3-clause-clear, c-uda, cc, cc0-1.0, cc-by-2.0, "
    "cc-by-2.5, cc-by-3.0, cc-by-4.0, cc-by-sa-3.0, cc-by-sa-4.0, cc-by-nc-2.0, cc-by-nc-3.0, cc-by-nc-4.0, cc-by-nd-4.0, "
    "cc-by-nc-nd-3.0, cc-by-nc-nd-4.0, cc-by-nc-sa-2.0, cc-by-nc-sa-3.0, cc-by-nc-sa-4.0, cdla-sharing-1.0, cdla-permissive-1.0, "
    "cdla-permissive-2.0, wtfpl, ecl-2.0, epl-1.0, epl-2.0, etalab-2.0, eupl-1.1, eupl-1.2, agpl-3.0, gfdl, gpl, gpl-2.0, gpl-3.0, "
    "lgpl, lgpl-2.1, lgpl-3.0, isc, h-research, intel-research, lppl-1.3c, ms-pl, apple-ascl, apple-amlr, mpl-2.0, odc-by, odbl, "
    "openmdw-1.0, openrail++, osl-3.0, postgresql, ofl-1.1, ncsa, unlicense, zlib, pddl, lgpl-lr, deepfloyd-if-license, "
    "fair-noncommercial-research-license, llama2, llama3, llama3.1, llama3.2, llama3.3, llama4, grok2-community, gemma, unknown, other"
).split(", ")


def _yaml_front_matter_errors(content: str) -> list[str]:
    """Errors the Hub's /api/validate-yaml would (at least) report, for a subset of YAML: layout,
    and a `license` outside the Hub's list."""
    try:
        lines = _front_matter_lines(content)
    except ValueError as err:
        return [str(err)]
    if lines is None:
        return []
    errors = []
    for n, line in enumerate(lines, start=2):
        if "\t" in line[: len(line) - len(line.lstrip())]:
            errors.append(f"line {n}: tabs are not allowed for indentation")
        elif line.strip() and not line.startswith((" ", "-", "#")) and not re.match(r"^[^:#]+:(\s|$)", line):
            errors.append(f"line {n}: expected 'key: value', got {line!r}")
    if not errors:
        licenses = (_parse_front_matter(content.encode()) or {}).get("license")
        for value in licenses if isinstance(licenses, list) else [licenses] if licenses is not None else []:
            if value not in HUB_LICENSES:
                errors.append(f'"license" must be one of [{", ".join(HUB_LICENSES)}, array]')
                break
    return errors


def _scalar(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(t) for t in text[1:-1].split(",") if t.strip()]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "~", ""):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _parse_front_matter(raw: bytes) -> dict | None:
    """A README's YAML front matter as a mapping (PyYAML), or without PyYAML its top-level
    ``key: scalar`` / ``key: [a, b]`` / ``key:`` + ``- item`` entries (nested mappings are
    skipped). Used for ``cardData`` in repo_info and the license check of commits."""
    try:
        lines = _front_matter_lines(raw.decode("utf-8", "replace"))
    except ValueError:
        return None
    if lines is None:
        return None
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        try:
            parsed = yaml.safe_load("\n".join(lines))
        except yaml.YAMLError:
            return None
        return parsed if isinstance(parsed, dict) else None
    out: dict[str, Any] = {}
    key = None
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith((" ", "-")):
            k, _, v = line.partition(":")
            key = k.strip()
            out[key] = _scalar(v) if v.strip() else None
        elif key is not None and line.strip().startswith("- "):
            if not isinstance(out.get(key), list):
                out[key] = []
            out[key].append(_scalar(line.strip()[2:]))
    return out


def main(argv: list[str] | None = None) -> None:
    """Serve a test Hub until Ctrl-C: ``python tests/hubserver.py [--port N] [--cas-dir DIR]``.

    Prints the environment that points the real client (and ``entrypoint.py publish``) at it; on
    Ctrl-C prints every repo with its commits, tags and files. State lives in memory only.
    """
    import argparse
    import signal
    import sys

    ap = argparse.ArgumentParser(description="Serve a Hugging Face Hub-compatible test server on 127.0.0.1.")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    ap.add_argument("--cas-dir", help="folder for the Xet CAS (default: a temporary folder, removed on exit)")
    args = ap.parse_args(argv)

    def stop(signum: int, frame: Any) -> None:  # `kill` stops it as Ctrl-C does, with the summary
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    server = HubServer(cas_dir=args.cas_dir).start(args.port)
    print(f"test Hub serving on {server.url} (users: {TEST_USER} with org {TEST_ORG}, {OTHER_USER}); Ctrl-C stops it", flush=True)
    print(f"export HF_ENDPOINT={server.url} HF_TOKEN={TEST_TOKEN}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for repo_id in server.repo_ids():
            refs = ", ".join(f"{k}={v[:8]}" for k, v in {**server.branches(repo_id), **server.tags(repo_id)}.items())
            print(f"{repo_id} ({'private' if server.is_private(repo_id) else 'public'}; {refs}; {len(server.commits(repo_id))} commits on main)", file=sys.stderr)
            for path, size in sorted(server.files(repo_id).items()):
                print(f"  {path} {size}", file=sys.stderr)
        server.stop()


__all__ = [
    "GITATTRIBUTES",
    "INVALID_TOKEN",
    "LFS_PATTERNS",
    "OTHER_TOKEN",
    "OTHER_USER",
    "READ_TOKEN",
    "TEST_ORG",
    "TEST_TOKEN",
    "TEST_USER",
    "Commit",
    "Fault",
    "FileEntry",
    "HubServer",
    "RequestRecord",
    "git_blob_oid",
    "lfs_pointer",
]


if __name__ == "__main__":
    main()
