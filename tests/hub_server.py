"""A local Hugging Face Hub emulator, so that tests drive the real ``huggingface_hub`` client over HTTP.

It implements the endpoint contract of ``HUB_INTEGRATION.md`` §1.2 and §1.4 as ``huggingface_hub`` 2.4
uses it (with ``HF_HUB_DISABLE_XET=1``): repo creation and deletion, repo info, tree listings, the
preupload / LFS batch / NDJSON commit upload path, resolve downloads with ranges, refs, commits,
branches and tags. Everything lives in memory under one lock; every returned URL is built from the
request's ``Host`` header; expected errors are 4xx with the ``X-Error-Code`` the client maps to its
exceptions (a 5xx would cost ~23 s of client retries).

Usage::

    server = HubServer().start()
    os.environ["HF_ENDPOINT"] = server.endpoint   # before any Hugging Face import
    ...
    server.shutdown()
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import yaml

USER = "tester"
"""The account every token belongs to; repos created without an organization go to this namespace."""

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
"""Files at least this large go through LFS whatever their name (the Hub's rule)."""

DEFAULT_TREE_PAGE_SIZE = 1000

_TYPE_BY_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SAMPLE_SIZE = 512
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
_LFS_JSON = "application/vnd.git-lfs+json"
# What the Hub puts in the initial commit of a new repo (abridged, plus GGUF).
_INITIAL_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl",
        "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
        "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip
# The YAML front matter of a README (the same pattern huggingface_hub's RepoCard uses).
_FRONT_MATTER = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")


# --- state ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    """One version of a file: regular (``content``) or LFS (``sha256``, content in the LFS store).

    ``oid`` is the git blob SHA-1 of what git stores: the content, or the LFS pointer file.
    """

    size: int
    oid: str
    content: bytes | None = None
    sha256: str | None = None
    pointer_size: int | None = None

    @property
    def upload_oid(self) -> str:
        """The id the client compares with its local file to detect a no-op upload (§1.2 preupload)."""
        return self.sha256 or self.oid


@dataclass(frozen=True)
class _Commit:
    sha: str
    parent: str | None
    files: dict[str, _Blob]
    title: str
    message: str
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    sdk: str | None
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    # "refs/pr/N" -> head commit of pull request N.
    pull_requests: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)


class _HubError(Exception):
    """An expected error, answered as ``status`` with ``X-Error-Code: code`` and a JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra or {}
        self.headers = headers or {}


@dataclass
class _Request:
    method: str
    raw_path: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    base: str

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        """A boolean query parameter (the client sends lowercase ``true``/``false`` or ``1``)."""
        return (self.param(name) or "").lower() in {"1", "true"}

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise _HubError(400, f"Malformed JSON body: {err}") from None


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json_response(
    payload: Any,
    status: int = 200,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> _Response:
    return _Response(status, json.dumps(payload).encode(), {"Content-Type": content_type, **(headers or {})})


def _now() -> str:
    """The current time in the Hub's format (``2022-08-19T07:19:38.123Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _regular_blob(data: bytes) -> _Blob:
    return _Blob(size=len(data), oid=_git_blob_sha1(data), content=data)


def _lfs_blob(sha256: str, size: int) -> _Blob:
    pointer = _LFS_POINTER.format(oid=sha256, size=size).encode()
    return _Blob(size=size, oid=_git_blob_sha1(pointer), sha256=sha256, pointer_size=len(pointer))


def _git_pattern_matches(pattern: str, path: str) -> bool:
    """Whether a ``.gitattributes``/``.gitignore`` pattern matches ``path`` (no negation, no escapes).

    As in git, a pattern without a slash matches the file name at any depth; one with a slash is
    anchored at the repo root. A trailing slash (a folder pattern) matches everything below it.
    """
    pattern = pattern.strip()
    if pattern.endswith("/"):
        folder = pattern.strip("/")
        return any(
            fnmatch.fnmatchcase(prefix if "/" in folder else name, folder)
            for prefix, name in _folder_prefixes(path)
        )
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern.lstrip("/"))


def _folder_prefixes(path: str) -> Iterator[tuple[str, str]]:
    """``(folder path, folder name)`` of every folder that contains ``path``."""
    parts = path.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        yield "/".join(parts[:depth]), parts[depth - 1]


def _card_data(readme: bytes) -> dict[str, Any] | None:
    """The YAML front matter of a README as a dict; ``None`` when there is none.

    Raises:
        ValueError: the front matter is not valid YAML or not a mapping.
    """
    match = _FRONT_MATTER.search(readme.decode("utf-8", errors="replace"))
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as err:
        raise ValueError(f"Invalid YAML in the README front matter: {err}") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("The README front matter must be a YAML mapping.")
    return data


class _HubState:
    """Repos, commits and the content-addressed LFS store, and the lookups the endpoints share.

    Callers hold ``lock`` for the whole of a request, so every request sees and leaves a consistent state.
    """

    def __init__(self, tree_page_size: int) -> None:
        self.lock = threading.Lock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.tree_page_size = tree_page_size

    # -- lookups -----------------------------------------------------------------------------------------------

    def repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository Not Found for {repo_type} {repo_id!r}.", "RepoNotFound")
        return repo

    @staticmethod
    def resolve(repo: _Repo, revision: str) -> _Commit:
        """A branch, then a tag, a pull-request ref, a full sha, a unique sha prefix."""
        sha = repo.branches.get(revision) or repo.tags.get(revision) or repo.pull_requests.get(revision)
        if sha is None and revision in repo.commits:
            sha = revision
        if sha is None and re.fullmatch(r"[0-9a-f]{4,39}", revision):
            matches = [candidate for candidate in repo.commits if candidate.startswith(revision)]
            sha = matches[0] if len(matches) == 1 else None
        if sha is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    def content(self, blob: _Blob) -> bytes:
        return blob.content if blob.sha256 is None else self.lfs_objects[blob.sha256]

    # -- writing -----------------------------------------------------------------------------------------------

    def create_repo(self, repo_type: str, repo_id: str, *, private: bool, sdk: str | None) -> _Repo:
        repo = _Repo(repo_type, repo_id, private, sdk, created_at=_now())
        self.repos[(repo_type, repo_id)] = repo
        initial = {".gitattributes": _regular_blob(_INITIAL_GITATTRIBUTES.encode())}
        repo.branches["main"] = self.add_commit(repo, None, initial, "initial commit").sha
        return repo

    @staticmethod
    def add_commit(
        repo: _Repo, parent: str | None, files: dict[str, _Blob], title: str, message: str = ""
    ) -> _Commit:
        sha = hashlib.sha1(f"{repo.repo_id}:{parent}:{uuid.uuid4()}".encode()).hexdigest()
        commit = _Commit(sha, parent, files, title, message, _now())
        repo.commits[sha] = commit
        return commit

    def upload_mode(self, files: dict[str, _Blob], path: str, size: int, sample: bytes) -> str:
        """``"lfs"`` for a ``filter=lfs`` pattern of ``.gitattributes``, ≥ 10 MiB, or a NUL byte in the sample."""
        if size >= LFS_SIZE_THRESHOLD or b"\0" in sample:
            return "lfs"
        attributes = files.get(".gitattributes")
        lines = self.content(attributes).decode(errors="replace").splitlines() if attributes else []
        patterns = [line.split()[0] for line in lines if "filter=lfs" in line.split()[1:]]
        return "lfs" if any(_git_pattern_matches(pattern, path) for pattern in patterns) else "regular"

    # -- listing -----------------------------------------------------------------------------------------------

    @staticmethod
    def folders(files: dict[str, _Blob]) -> set[str]:
        return {prefix for path in files for prefix, _ in _folder_prefixes(path)}

    def entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any] | None:
        """The tree entry of a file or folder (``None`` when neither exists), as ``list_repo_tree`` parses it."""
        blob = commit.files.get(path)
        if blob is not None:
            entry: dict[str, Any] = {"type": "file", "path": path, "oid": blob.oid, "size": blob.size}
            if blob.sha256 is not None:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
        elif path in self.folders(commit.files):
            inside = sorted((name, b.oid) for name, b in commit.files.items() if name.startswith(path + "/"))
            entry = {
                "type": "directory",
                "path": path,
                "oid": hashlib.sha1(repr(inside).encode()).hexdigest(),
            }
        else:
            return None
        if expand:
            last = self.last_change(repo, commit, path)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
        return entry

    @staticmethod
    def last_change(repo: _Repo, commit: _Commit, path: str) -> _Commit:
        """The most recent ancestor of ``commit`` (itself included) that changed the file or folder ``path``."""

        def snapshot(files: dict[str, _Blob]) -> dict[str, str]:
            return {name: b.oid for name, b in files.items() if name == path or name.startswith(path + "/")}

        while commit.parent is not None:
            parent = repo.commits[commit.parent]
            if snapshot(commit.files) != snapshot(parent.files):
                return commit
            commit = parent
        return commit

    def repo_summary(self, repo: _Repo, commit: _Commit, blobs: bool = False) -> dict[str, Any]:
        """``model_info``/``dataset_info``/``space_info`` and ``list_models`` entries."""
        card = {}
        readme = commit.files.get("README.md")
        if readme is not None:
            try:
                card = _card_data(self.content(readme)) or {}
            except ValueError:
                card = {}
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            blob = commit.files[path]
            if blobs:
                sibling.update(size=blob.size, blobId=blob.oid)
                if blob.sha256 is not None:
                    sibling["lfs"] = {
                        "size": blob.size,
                        "sha256": blob.sha256,
                        "pointerSize": blob.pointer_size,
                    }
            siblings.append(sibling)
        card_tags = card.get("tags")
        tags = [tag for tag in card_tags if isinstance(tag, str)] if isinstance(card_tags, list) else []
        info: dict[str, Any] = {
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "createdAt": repo.created_at,
            "lastModified": commit.date,
            "tags": tags,
            "siblings": siblings,
        }
        if card:
            info["cardData"] = card
        if repo.repo_type == "model":
            info.update({key: card[key] for key in ("library_name", "pipeline_tag") if key in card})
        if repo.repo_type == "space":
            info["sdk"] = repo.sdk
        return info


# --- routes -----------------------------------------------------------------------------------------------------


def _repo_url(base: str, repo_type: str, repo_id: str) -> str:
    return f"{base}/{_URL_PREFIX[repo_type]}{repo_id}"


class _Router:
    """Maps a request to the endpoint that answers it; every endpoint runs with the state lock held."""

    def __init__(self, state: _HubState) -> None:
        self.state = state
        # (method, first path segment after /api/{T}/{ns}/{name}/) -> endpoint(request, repo, remaining segments)
        self.repo_api: dict[tuple[str, str], Callable[[_Request, _Repo, list[str]], _Response]] = {
            ("GET", "revision"): self.repo_info,
            ("GET", "tree"): self.tree,
            ("POST", "paths-info"): self.paths_info,
            ("POST", "preupload"): self.preupload,
            ("POST", "commit"): self.commit,
            ("GET", "refs"): self.refs,
            ("GET", "commits"): self.commits,
            ("POST", "branch"): self.create_branch,
            ("DELETE", "branch"): self.delete_branch,
            ("POST", "tag"): self.create_tag,
            ("DELETE", "tag"): self.delete_tag,
        }

    def dispatch(self, request: _Request) -> _Response:
        segments = request.segments
        method = "GET" if request.method == "HEAD" else request.method
        if segments[:1] == ["api"]:
            return self.api(request, method, segments[1:])
        if segments[:1] == ["_lfs"] and len(segments) >= 2:
            if method == "PUT" and len(segments) == 2:
                return self.lfs_upload(request, segments[1])
            if method == "POST" and segments[2:] == ["verify"]:
                return self.lfs_verify(request, segments[1])
        repo_type = "model"
        if segments[0] in ("datasets", "spaces") and len(segments) > 3:
            repo_type, segments = _TYPE_BY_PLURAL[segments[0]], segments[1:]
        if method == "POST" and segments[1:2] and segments[1].endswith(".git"):
            if segments[2:] == ["info", "lfs", "objects", "batch"]:
                return self.lfs_batch(
                    request, self.state.repo(repo_type, f"{segments[0]}/{segments[1][:-4]}")
                )
        if len(segments) > 4 and segments[2] == "resolve" and method == "GET":
            repo = self.state.repo(repo_type, "/".join(segments[:2]))
            return self.resolve(request, repo, segments[3], "/".join(segments[4:]))
        raise _HubError(404, f"No route for {request.method} {request.raw_path}")

    def api(self, request: _Request, method: str, segments: list[str]) -> _Response:
        route = (method, *segments)
        if route == ("POST", "repos", "create"):
            return self.create_repo(request)
        if route == ("DELETE", "repos", "delete"):
            return self.delete_repo(request)
        if route == ("POST", "validate-yaml"):
            return self.validate_yaml(request)
        if route == ("GET", "whoami-v2"):
            return self.whoami(request)
        repo_type = _TYPE_BY_PLURAL.get(segments[0]) if segments else None
        if repo_type is not None and method == "GET" and len(segments) == 1:
            return self.list_repos(request, repo_type)
        if repo_type is not None and len(segments) >= 3:
            repo = self.state.repo(repo_type, "/".join(segments[1:3]))
            rest = segments[3:]
            if not rest and method == "GET":
                return self.repo_info(request, repo, ["main"])
            handler = self.repo_api.get((method, rest[0])) if rest else None
            if handler is not None:
                return handler(request, repo, rest[1:])
        raise _HubError(404, f"No route for {request.method} {request.raw_path}")

    # -- repos -------------------------------------------------------------------------------------------------

    @staticmethod
    def _named_repo_id(body: dict[str, Any]) -> tuple[str, str]:
        name = body.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise _HubError(400, f"Invalid repo name: {name!r}")
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"Invalid repo type: {repo_type!r}")
        return repo_type, f"{body.get('organization') or USER}/{name}"

    def create_repo(self, request: _Request) -> _Response:
        body = request.json()
        repo_type, repo_id = self._named_repo_id(body)
        url = _repo_url(request.base, repo_type, repo_id)
        if (repo_type, repo_id) in self.state.repos:
            # The client reads "url" from the 409 too, when exist_ok=True.
            raise _HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        private = body.get("private") is True or body.get("visibility") == "private"
        self.state.create_repo(repo_type, repo_id, private=private, sdk=body.get("sdk"))
        return _json_response({"url": url, "name": repo_id})

    def delete_repo(self, request: _Request) -> _Response:
        key = self._named_repo_id(request.json())
        self.state.repo(*key)
        del self.state.repos[key]
        return _json_response({})

    def repo_info(self, request: _Request, repo: _Repo, revision: list[str]) -> _Response:
        commit = self.state.resolve(repo, "/".join(revision))
        return _json_response(self.state.repo_summary(repo, commit, blobs=request.flag("blobs")))

    def list_repos(self, request: _Request, repo_type: str) -> _Response:
        author = request.param("author")
        search = (request.param("search") or "").lower()
        repos = [
            repo
            for (kind, repo_id), repo in sorted(self.state.repos.items())
            if kind == repo_type
            and (author is None or repo_id.split("/")[0] == author)
            and search in repo_id.lower()
        ]
        limit = request.param("limit")
        if limit is not None and limit.isdigit():
            repos = repos[: int(limit)]
        return _json_response(
            [self.state.repo_summary(repo, repo.commits[repo.branches["main"]]) for repo in repos]
        )

    @staticmethod
    def whoami(request: _Request) -> _Response:
        if not request.headers.get("Authorization"):
            raise _HubError(401, "Invalid credentials in Authorization header")
        return _json_response(
            {
                "type": "user",
                "name": USER,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            }
        )

    @staticmethod
    def validate_yaml(request: _Request) -> _Response:
        try:
            _card_data(str(request.json().get("content", "")).encode())
        except ValueError as err:
            return _json_response({"errors": [{"message": str(err)}], "warnings": []}, status=400)
        return _json_response({"errors": [], "warnings": []})

    # -- refs --------------------------------------------------------------------------------------------------

    def refs(self, request: _Request, repo: _Repo, rest: list[str]) -> _Response:
        def listing(refs: dict[str, str], prefix: str) -> list[dict[str, str]]:
            return [
                {"name": name, "ref": f"{prefix}{name}", "targetCommit": sha}
                for name, sha in sorted(refs.items())
            ]

        payload: dict[str, Any] = {
            "branches": listing(repo.branches, "refs/heads/"),
            "tags": listing(repo.tags, "refs/tags/"),
            "converts": [],
        }
        if request.flag("include_prs"):
            payload["pullRequests"] = listing(repo.pull_requests, "")
        return _json_response(payload)

    def commits(self, request: _Request, repo: _Repo, revision: list[str]) -> _Response:
        commit: _Commit | None = self.state.resolve(repo, "/".join(revision))
        history = []
        while commit is not None:
            history.append(
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": USER}],
                    "date": commit.date,
                }
            )
            commit = repo.commits[commit.parent] if commit.parent else None
        return _json_response(history)

    def create_branch(self, request: _Request, repo: _Repo, branch: list[str]) -> _Response:
        name = "/".join(branch)
        if name in repo.branches:
            raise _HubError(409, f"Reference refs/heads/{name} already exists")
        start = request.json().get("startingPoint") or "main"
        repo.branches[name] = self.state.resolve(repo, start).sha
        return _json_response({})

    def delete_branch(self, request: _Request, repo: _Repo, branch: list[str]) -> _Response:
        name = "/".join(branch)
        if name == "main":
            raise _HubError(403, "Cannot delete the default branch")
        if repo.branches.pop(name, None) is None:
            raise _HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        return _json_response({})

    def create_tag(self, request: _Request, repo: _Repo, revision: list[str]) -> _Response:
        tag = request.json().get("tag")
        if not isinstance(tag, str) or not tag:
            raise _HubError(400, "Missing tag name")
        if tag in repo.tags:
            raise _HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = self.state.resolve(repo, "/".join(revision)).sha
        return _json_response({})

    def delete_tag(self, request: _Request, repo: _Repo, tag: list[str]) -> _Response:
        if repo.tags.pop("/".join(tag), None) is None:
            raise _HubError(404, f"Invalid rev id: {'/'.join(tag)}", "RevisionNotFound")
        return _json_response({})

    # -- listing -----------------------------------------------------------------------------------------------

    def tree(self, request: _Request, repo: _Repo, rest: list[str]) -> _Response:
        if not rest:
            raise _HubError(400, "Missing revision")
        commit = self.state.resolve(repo, rest[0])
        folder = "/".join(rest[1:]).strip("/")
        if folder and folder not in self.state.folders(commit.files):
            raise _HubError(404, f"Folder {folder!r} not found at {rest[0]}", "EntryNotFound")
        recursive = request.flag("recursive")
        paths = sorted(set(commit.files) | self.state.folders(commit.files))
        prefix = folder + "/" if folder else ""
        below = [
            path
            for path in paths
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])
        ]
        start = int(request.param("cursor") or 0)
        page = below[start : start + self.state.tree_page_size]
        entries = [self.state.entry(repo, commit, path, request.flag("expand")) for path in page]
        headers = {}
        if start + len(page) < len(below):
            query = {**{key: values[0] for key, values in request.query.items()}, "cursor": start + len(page)}
            headers["Link"] = f'<{request.base}{request.raw_path}?{urlencode(query)}>; rel="next"'
        return _json_response(entries, headers=headers)

    def paths_info(self, request: _Request, repo: _Repo, revision: list[str]) -> _Response:
        commit = self.state.resolve(repo, "/".join(revision))
        form = parse_qs(request.body.decode())
        expand = (form.get("expand") or ["false"])[0].lower() == "true"
        entries = [self.state.entry(repo, commit, path.strip("/"), expand) for path in form.get("paths", [])]
        return _json_response([entry for entry in entries if entry is not None])

    # -- upload ------------------------------------------------------------------------------------------------

    def preupload(self, request: _Request, repo: _Repo, revision: list[str]) -> _Response:
        commit = self.state.resolve(repo, "/".join(revision))
        body = request.json()
        gitignore = body.get("gitIgnore")
        if gitignore is None and ".gitignore" in commit.files:
            gitignore = self.state.content(commit.files[".gitignore"]).decode(errors="replace")
        ignore_patterns = [
            line
            for line in (gitignore or "").splitlines()
            if line.strip() and not line.startswith(("#", "!"))
        ]
        answers = []
        for file in body.get("files", []):
            path, size = file["path"], int(file["size"])
            existing = commit.files.get(path)
            answers.append(
                {
                    "path": path,
                    "uploadMode": self.state.upload_mode(
                        commit.files, path, size, base64.b64decode(file["sample"])
                    ),
                    "shouldIgnore": any(_git_pattern_matches(pattern, path) for pattern in ignore_patterns),
                    "oid": existing.upload_oid if existing is not None else None,
                }
            )
        return _json_response({"files": answers})

    def lfs_batch(self, request: _Request, repo: _Repo) -> _Response:
        body = request.json()
        if body.get("operation") != "upload":
            raise _HubError(400, "This emulator only implements the LFS upload operation")
        objects = []
        for item in body.get("objects", []):
            oid, size = item["oid"], item["size"]
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            # An object already stored gets no actions: the client then skips its upload.
            if oid not in self.state.lfs_objects:
                answer["actions"] = {
                    "upload": {"href": f"{request.base}/_lfs/{oid}", "header": {}},
                    "verify": {"href": f"{request.base}/_lfs/{oid}/verify", "header": {}},
                }
            objects.append(answer)
        return _json_response({"transfer": "basic", "objects": objects}, content_type=_LFS_JSON)

    def lfs_upload(self, request: _Request, oid: str) -> _Response:
        actual = hashlib.sha256(request.body).hexdigest()
        if actual != oid:
            raise _HubError(400, f"SHA-256 mismatch: the upload URL names {oid}, the body hashes to {actual}")
        self.state.lfs_objects[oid] = request.body
        return _Response(200)

    def lfs_verify(self, request: _Request, oid: str) -> _Response:
        stored = self.state.lfs_objects.get(oid)
        if stored is None or len(stored) != request.json().get("size"):
            raise _HubError(404, f"LFS object {oid} was not uploaded (or has another size)")
        return _json_response({})

    def commit(self, request: _Request, repo: _Repo, revision: list[str]) -> _Response:
        name = "/".join(revision)
        head = repo.branches.get(name) or repo.pull_requests.get(name)
        if head is None:
            self.state.resolve(repo, name)  # RevisionNotFound for an unknown revision
            raise _HubError(400, f"Can only commit to a branch or a pull request, not to {name!r}")
        lines = [json.loads(line) for line in request.body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != head:
            raise _HubError(412, f"parentCommit {parent_commit} is not the head of {name} ({head})")
        files = dict(repo.commits[head].files)
        for line in lines:
            self._apply(files, line["key"], line["value"])
        title, description = header.get("summary") or "Upload files", header.get("description") or ""
        commit = self.state.add_commit(repo, head, files, title, description)
        url = _repo_url(request.base, repo.repo_type, repo.repo_id)
        payload = {"commitOid": commit.sha, "commitUrl": f"{url}/commit/{commit.sha}"}
        if request.flag("create_pr"):
            number = len(repo.pull_requests) + 1
            repo.pull_requests[f"refs/pr/{number}"] = commit.sha
            payload["pullRequestUrl"] = f"{url}/discussions/{number}"
        elif name in repo.branches:
            repo.branches[name] = commit.sha
        else:
            repo.pull_requests[name] = commit.sha
        return _json_response(payload)

    def _apply(self, files: dict[str, _Blob], key: str, value: dict[str, Any]) -> None:
        """Apply one NDJSON commit operation to ``files`` in place."""
        if key == "file":
            files[value["path"]] = _regular_blob(base64.b64decode(value["content"]))
        elif key == "lfsFile":
            stored = self.state.lfs_objects.get(value["oid"])
            if stored is None:
                raise _HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
            files[value["path"]] = _lfs_blob(value["oid"], len(stored))
        elif key == "deletedFile":
            if files.pop(value["path"], None) is None:
                raise _HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
        elif key == "deletedFolder":
            folder = value["path"].strip("/") + "/"
            doomed = [path for path in files if path.startswith(folder)]
            if not doomed:
                raise _HubError(
                    404, f"A folder with this name doesn't exist: {value['path']}", "EntryNotFound"
                )
            for path in doomed:
                del files[path]
        elif key != "header":
            raise _HubError(400, f"Unknown commit operation {key!r}")

    # -- download ----------------------------------------------------------------------------------------------

    def resolve(self, request: _Request, repo: _Repo, revision: str, path: str) -> _Response:
        commit = self.state.resolve(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            # X-Repo-Commit lets the client cache the absence (.no_exist/<sha>/<path>).
            raise _HubError(
                404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit.sha}
            )
        data = self.state.content(blob)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.upload_oid}"',
        }
        if blob.sha256 is not None:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        byte_range = _parse_range(request.headers.get("Range"), len(data))
        if byte_range is None:
            return _Response(200, data, headers)
        start, end = byte_range
        if start >= len(data) or start > end:
            headers["Content-Range"] = f"bytes */{len(data)}"
            return _Response(416, b"", headers)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _Response(206, data[start : end + 1], headers)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte of a single ``Range: bytes=…`` header (``None`` when absent or unsupported)."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if not first:  # a suffix: the last N bytes
        return max(size - int(last), 0), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


# --- HTTP ------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        """Silence the per-request log lines (``HubServer.requests`` records them)."""

    def _handle(self, method: str) -> None:
        hub = self.server.hub
        body = self._read_body()
        split = urlsplit(self.path)
        request = _Request(
            method=method,
            raw_path=split.path,
            # Split first, then unquote: a revision like "refs%2Fpr%2F1" is one segment.
            segments=[unquote(segment) for segment in split.path.split("/")[1:]],
            query=parse_qs(split.query),
            headers=self.headers,
            body=body,
            base=f"http://{self.headers.get('Host') or hub.endpoint.removeprefix('http://')}",
        )
        self._write(hub._answer(request), with_body=method != "HEAD")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _write(self, response: _Response, *, with_body: bool) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if with_body:
            self.wfile.write(response.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        super().__init__(("127.0.0.1", 0), _Handler)


class HubServer:
    """A Hugging Face Hub emulator on ``127.0.0.1`` (an ephemeral port), serving in a daemon thread.

    Attributes:
        requests: ``(method, path)`` of every request received, in order; ``path`` is percent-encoded
            as sent and has no query string (e.g. ``("HEAD", "/tester/x/resolve/main/config.json")``).
    """

    def __init__(self, tree_page_size: int = DEFAULT_TREE_PAGE_SIZE) -> None:
        """``tree_page_size``: entries per ``tree`` page before a ``Link: rel="next"`` (the Hub uses 1000)."""
        self._state = _HubState(tree_page_size)
        self._router = _Router(self._state)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[tuple[str, str]] = []

    def start(self) -> HubServer:
        """Bind an ephemeral port on 127.0.0.1 and serve in a daemon thread; returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError("HubServer already started")
        self._httpd = _Server(self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``, the value for ``HF_ENDPOINT``."""
        if self._httpd is None:
            raise RuntimeError("HubServer not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def shutdown(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None

    def clear_requests(self) -> None:
        """Forget the recorded requests (to assert on what a later call sends)."""
        with self._state.lock:
            self.requests.clear()

    def _answer(self, request: _Request) -> _Response:
        """Record the request and answer it; expected errors become 4xx with ``X-Error-Code``."""
        with self._state.lock:
            self.requests.append((request.method, request.raw_path))
            try:
                return self._router.dispatch(request)
            except _HubError as err:
                headers = dict(err.headers)
                if err.code is not None:
                    headers["X-Error-Code"] = err.code
                headers["X-Error-Message"] = " ".join(err.message.encode("ascii", "replace").decode().split())
                return _json_response({"error": err.message, **err.extra}, err.status, headers)
            except Exception as err:
                # An emulator bug or a request it does not understand: a 400 fails the test at once,
                # where a 5xx (or a dropped connection) would be retried by the client for ~23 s.
                traceback.print_exc()
                message = f"Hub emulator cannot handle {request.method} {request.raw_path}: {err!r}"
                return _json_response({"error": message}, 400, {"X-Error-Message": message[:500]})

    @contextmanager
    def _lookup(self) -> Iterator[None]:
        """Hold the state lock; a missing repo, revision or file raises ``KeyError``."""
        with self._state.lock:
            try:
                yield
            except _HubError as err:
                raise KeyError(err.message) from None

    def head_sha(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit sha that ``revision`` (branch, tag, PR ref or sha) points to."""
        with self._lookup():
            return self._state.resolve(self._state.repo(repo_type, repo_id), revision).sha

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """The stored content of ``path`` at ``revision``."""
        with self._lookup():
            commit = self._state.resolve(self._state.repo(repo_type, repo_id), revision)
            if path not in commit.files:
                raise KeyError(f"{path!r} not in {repo_type} {repo_id!r} at {revision}")
            return self._state.content(commit.files[path])

    def corrupt_file(self, repo_id: str, path: str, data: bytes, repo_type: str = "model") -> str:
        """Replace the content of an existing file at the head of ``main`` with ``data``, as a new commit.

        The file keeps its storage (LFS or regular), so tests can serve truncated or corrupt artifacts
        through the normal download path. Returns the new commit sha.
        """
        with self._lookup():
            repo = self._state.repo(repo_type, repo_id)
            head = repo.commits[repo.branches["main"]]
            if path not in head.files:
                raise KeyError(f"{path!r} not in {repo_type} {repo_id!r} at main")
            if head.files[path].sha256 is None:
                blob = _regular_blob(data)
            else:
                sha256 = hashlib.sha256(data).hexdigest()
                self._state.lfs_objects[sha256] = data
                blob = _lfs_blob(sha256, len(data))
            commit = self._state.add_commit(repo, head.sha, {**head.files, path: blob}, f"Corrupt {path}")
            repo.branches["main"] = commit.sha
            return commit.sha
