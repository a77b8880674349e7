"""The local Hub emulator, driven by the real huggingface_hub client (and transformers) over HTTP."""

from __future__ import annotations

import hashlib
import http.client
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    RepoFile,
    RepoFolder,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.hub_server import HubServer
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

README = """---
license: apache-2.0
library_name: transformers
tags:
- knowledge-editing
---
# A test model
"""


@dataclass(frozen=True)
class Published:
    """A repo uploaded once per module: its id, the local folder it mirrors and the upload commit."""

    repo_id: str
    folder: Path
    sha: str


def _files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()
    }


def _write_model_folder(folder: Path) -> None:
    """README with card YAML, an LFS safetensors file, a regular JSON file, a NUL-containing file in a folder."""
    folder.mkdir()
    (folder / "README.md").write_text(README)
    save_file({"weight": torch.arange(24, dtype=torch.float32).reshape(4, 6)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 6}))
    (folder / "stale.json").write_text("{}")
    (folder / "raw").mkdir()
    (folder / "raw" / "sample.dat").write_bytes(b"binary\0payload" * 10)


@pytest.fixture(scope="module")
def published(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Published:
    folder = tmp_path_factory.mktemp("published") / "model"
    _write_model_folder(folder)
    api = HfApi()
    repo_id = api.create_repo("published-model").repo_id
    hub_server.clear_requests()
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload model")
    # §1.5: validate-yaml → preupload → LFS batch → PUT → verify → commit. raw/sample.dat is an LFS file too and
    # the client uploads LFS files on parallel threads, so only model.safetensors' own PUT and verify are ordered.
    sequence = [
        (method, path.removeprefix("/_lfs/") if path.startswith("/_lfs/") else path)
        for method, path in hub_server.requests
    ]
    lfs_oid = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    expected = [
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{repo_id}/preupload/main"),
        ("POST", f"/{repo_id}.git/info/lfs/objects/batch"),
        ("PUT", lfs_oid),
        ("POST", f"{lfs_oid}/verify"),
        ("POST", f"/api/models/{repo_id}/commit/main"),
    ]
    assert list(dict.fromkeys(step for step in sequence if step in expected)) == expected
    return Published(repo_id, folder, commit.oid)


def test_environment_points_every_library_at_the_emulator(hub_server: HubServer) -> None:
    assert huggingface_hub.constants.ENDPOINT == hub_server.endpoint
    assert huggingface_hub.constants.HF_HUB_DISABLE_XET
    assert not huggingface_hub.constants.HF_HUB_OFFLINE
    assert HfApi().whoami()["name"] == "tester"


def test_create_repo_conflict_exist_ok_and_delete(
    hub_api: HfApi, unique_repo_id: Callable[[str], str]
) -> None:
    repo_id = unique_repo_id("create")
    url = hub_api.create_repo(repo_id)
    assert url.repo_id == repo_id and url.endpoint == huggingface_hub.constants.ENDPOINT
    assert hub_api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as conflict:
        hub_api.create_repo(repo_id)
    assert conflict.value.response.status_code == 409

    # A fresh repo already has a commit holding the LFS patterns.
    assert hub_api.list_repo_files(repo_id) == [".gitattributes"]

    dataset = hub_api.create_repo(repo_id, repo_type="dataset", private=True)
    assert dataset.url == f"{huggingface_hub.constants.ENDPOINT}/datasets/{repo_id}"
    assert hub_api.dataset_info(repo_id).private is True

    hub_api.delete_repo(repo_id)
    assert not hub_api.repo_exists(repo_id)
    assert hub_api.repo_exists(repo_id, repo_type="dataset")
    hub_api.delete_repo(repo_id, missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        hub_api.delete_repo(repo_id)


def test_create_repo_without_namespace_goes_to_the_token_user(hub_api: HfApi) -> None:
    name = f"no-namespace-{uuid.uuid4().hex[:8]}"
    assert hub_api.create_repo(name).repo_id == f"tester/{name}"
    assert [model.id for model in hub_api.list_models(author="tester", search=name)] == [f"tester/{name}"]


def test_model_info_reports_sha_siblings_lfs_and_card(
    hub_api: HfApi, hub_server: HubServer, published: Published
) -> None:
    info = hub_api.model_info(published.repo_id, files_metadata=True)
    assert info.sha == published.sha == hub_server.head_sha(published.repo_id)
    assert {sibling.rfilename for sibling in info.siblings} == {".gitattributes", *_files(published.folder)}
    assert info.card_data.license == "apache-2.0"
    assert info.card_data.tags == ["knowledge-editing"] == info.tags
    assert info.library_name == "transformers"
    siblings = {sibling.rfilename: sibling for sibling in info.siblings}
    weights = (published.folder / "model.safetensors").read_bytes()
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert siblings["model.safetensors"].size == len(weights)
    assert siblings["raw/sample.dat"].lfs is not None  # a NUL byte in the sample makes it LFS
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == hashlib.sha1(b"blob 18\0" + b'{"hidden_size": 6}').hexdigest()
    assert hub_api.model_info(published.repo_id, revision=published.sha[:10]).sha == published.sha


def test_tree_listings_and_paths_info(hub_api: HfApi, published: Published) -> None:
    assert sorted(hub_api.list_repo_files(published.repo_id)) == sorted(
        [".gitattributes", *_files(published.folder)]
    )
    root = {entry.path: entry for entry in hub_api.list_repo_tree(published.repo_id)}
    assert isinstance(root["raw"], RepoFolder) and isinstance(root["config.json"], RepoFile)
    assert "raw/sample.dat" not in root
    (nested,) = hub_api.list_repo_tree(published.repo_id, path_in_repo="raw", expand=True)
    assert nested.path == "raw/sample.dat" and nested.lfs.size == len(b"binary\0payload" * 10)
    assert nested.last_commit.oid == published.sha
    with pytest.raises(EntryNotFoundError):
        list(hub_api.list_repo_tree(published.repo_id, path_in_repo="missing"))

    infos = hub_api.get_paths_info(published.repo_id, ["config.json", "raw", "missing.txt"])
    assert sorted((type(entry).__name__, entry.path) for entry in infos) == [
        ("RepoFile", "config.json"),
        ("RepoFolder", "raw"),
    ]


def test_tree_pages_follow_the_link_header(tmp_path: Path) -> None:
    server = HubServer(tree_page_size=2).start()
    try:
        api = HfApi(endpoint=server.endpoint)
        repo_id = api.create_repo("paged").repo_id
        operations = [CommitOperationAdd(f"file{i}.txt", f"content {i}".encode()) for i in range(5)]
        api.create_commit(repo_id, operations, commit_message="five files")
        assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", *(f"file{i}.txt" for i in range(5))]
        tree_pages = [path for method, path in server.requests if "/tree/" in path]
        assert len(tree_pages) == 3
    finally:
        server.shutdown()


def test_downloads_are_bit_identical_and_offline_reload_sends_nothing(
    hub_server: HubServer, published: Published, fresh_hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = hf_hub_download(published.repo_id, "config.json")
    assert Path(config).is_relative_to(fresh_hf_cache)
    assert Path(config).read_bytes() == (published.folder / "config.json").read_bytes()

    snapshot = Path(snapshot_download(published.repo_id))
    assert snapshot.name == published.sha
    assert {path: data for path, data in _files(snapshot).items() if path != ".gitattributes"} == _files(
        published.folder
    )

    hub_server.clear_requests()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert Path(snapshot_download(published.repo_id)) == snapshot
    assert hf_hub_download(published.repo_id, "raw/sample.dat") == str(snapshot / "raw" / "sample.dat")
    assert hub_server.requests == []


def test_missing_repo_revision_and_file_raise_the_client_exceptions(
    hub_api: HfApi, published: Published, fresh_hf_cache: Path
) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hub_api.model_info("tester/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        hub_api.model_info(published.repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(published.repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(published.repo_id, "missing.txt")
    # The 404 carried X-Repo-Commit, so the client cached the absence.
    assert (fresh_hf_cache / f"models--tester--{published.repo_id.split('/')[1]}" / ".no_exist").is_dir()
    assert hub_api.file_exists(published.repo_id, "config.json")
    assert not hub_api.file_exists(published.repo_id, "missing.txt")


def test_safetensors_metadata_is_read_with_a_range_request(hub_api: HfApi, published: Published) -> None:
    metadata = hub_api.parse_safetensors_file_metadata(published.repo_id, "model.safetensors")
    assert metadata.tensors["weight"].shape == [4, 6]
    assert metadata.tensors["weight"].dtype == "F32"


def test_second_commit_deletes_stale_files_and_old_revision_stays_readable(
    hub_api: HfApi,
    hub_server: HubServer,
    unique_repo_id: Callable[[str], str],
    tmp_path: Path,
    fresh_hf_cache: Path,
) -> None:
    folder = tmp_path / "model"
    _write_model_folder(folder)
    repo_id = unique_repo_id("two-commits")
    hub_api.create_repo(repo_id)
    first = hub_api.upload_folder(folder_path=folder, repo_id=repo_id).oid

    # Unchanged files are detected through the preupload oids: no commit at all.
    assert hub_api.upload_folder(folder_path=folder, repo_id=repo_id).oid == first
    # Content the LFS store already holds is not sent again, even under another name.
    hub_server.clear_requests()
    copied = hub_api.upload_file(
        path_or_fileobj=folder / "model.safetensors", path_in_repo="copy.safetensors", repo_id=repo_id
    ).oid
    assert [method for method, _ in hub_server.requests].count("PUT") == 0
    assert hub_server.file_bytes(repo_id, "copy.safetensors") == (folder / "model.safetensors").read_bytes()

    (folder / "stale.json").unlink()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 7}))
    second = hub_api.upload_folder(folder_path=folder, repo_id=repo_id, delete_patterns=["*.json"]).oid
    assert hub_server.head_sha(repo_id) == second
    assert "stale.json" not in hub_api.list_repo_files(repo_id)
    assert "stale.json" in hub_api.list_repo_files(repo_id, revision=first)

    assert Path(hf_hub_download(repo_id, "config.json")).read_text() == '{"hidden_size": 7}'
    assert Path(hf_hub_download(repo_id, "config.json", revision=first)).read_text() == '{"hidden_size": 6}'
    assert hub_server.file_bytes(repo_id, "config.json", revision=first) == b'{"hidden_size": 6}'
    assert [commit.commit_id for commit in hub_api.list_repo_commits(repo_id)][:3] == [second, copied, first]


def test_files_matching_the_gitignore_are_not_committed(
    hub_api: HfApi, unique_repo_id: Callable[[str], str]
) -> None:
    repo_id = unique_repo_id("gitignore")
    hub_api.create_repo(repo_id)
    operations = [
        CommitOperationAdd(".gitignore", b"*.log\ncache/\n"),
        CommitOperationAdd("debug.log", b"noise"),
        CommitOperationAdd("cache/entry.txt", b"noise"),
        CommitOperationAdd("logs.txt", b"kept"),
    ]
    hub_api.create_commit(repo_id, operations, commit_message="with a .gitignore")
    assert sorted(hub_api.list_repo_files(repo_id)) == [".gitattributes", ".gitignore", "logs.txt"]


def test_branches_tags_pull_requests_and_parent_commit(
    hub_api: HfApi, hub_server: HubServer, unique_repo_id: Callable[[str], str], fresh_hf_cache: Path
) -> None:
    repo_id = unique_repo_id("refs")
    hub_api.create_repo(repo_id)
    initial = hub_server.head_sha(repo_id)
    hub_api.create_branch(repo_id, branch="edits/v1")
    on_branch = hub_api.upload_file(
        path_or_fileobj=b"branch", path_in_repo="note.txt", repo_id=repo_id, revision="edits/v1"
    )
    hub_api.create_tag(repo_id, tag="v0.1", revision="edits/v1")
    refs = hub_api.list_repo_refs(repo_id)
    assert {branch.name: branch.target_commit for branch in refs.branches} == {
        "main": initial,
        "edits/v1": on_branch.oid,
    }
    assert [(tag.name, tag.target_commit) for tag in refs.tags] == [("v0.1", on_branch.oid)]
    assert Path(hf_hub_download(repo_id, "note.txt", revision="v0.1")).read_bytes() == b"branch"
    assert not hub_api.file_exists(repo_id, "note.txt")  # main is untouched

    pr = hub_api.upload_file(
        path_or_fileobj=b"proposal", path_in_repo="note.txt", repo_id=repo_id, create_pr=True
    )
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert Path(hf_hub_download(repo_id, "note.txt", revision="refs/pr/1")).read_bytes() == b"proposal"
    assert hub_server.head_sha(repo_id) == initial

    with pytest.raises(HfHubHTTPError) as stale_parent:
        hub_api.create_commit(
            repo_id,
            [CommitOperationAdd("x.txt", b"x")],
            commit_message="based on an old head",
            revision="edits/v1",
            parent_commit=initial,
        )
    assert stale_parent.value.response.status_code == 412


def test_transformers_round_trip_through_the_hub(
    hub_api: HfApi,
    hub_server: HubServer,
    unique_repo_id: Callable[[str], str],
    tmp_path: Path,
    fresh_hf_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    repo_id = unique_repo_id("tiny-llama")
    hub_api.create_repo(repo_id)
    sha = hub_api.upload_folder(folder_path=tmp_path / "tiny", repo_id=repo_id).oid

    loaded = AutoModelForCausalLM.from_pretrained(repo_id)
    tokenizer = AutoTokenizer.from_pretrained(repo_id)
    assert (fresh_hf_cache / f"models--tester--{repo_id.split('/')[1]}" / "snapshots" / sha).is_dir()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert tokenizer("The capital").input_ids == tiny_tokenizer()("The capital").input_ids

    hub_server.clear_requests()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    AutoModelForCausalLM.from_pretrained(repo_id)
    assert hub_server.requests == []


def test_corrupt_file_changes_what_is_downloaded(
    hub_server: HubServer, hub_api: HfApi, unique_repo_id: Callable[[str], str], fresh_hf_cache: Path
) -> None:
    repo_id = unique_repo_id("corrupt")
    hub_api.create_repo(repo_id)
    weights = b"\0" * 64 + b"weights"
    before = hub_api.upload_file(
        path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id=repo_id
    ).oid
    after = hub_server.corrupt_file(repo_id, "model.safetensors", weights[:10])
    assert after == hub_server.head_sha(repo_id) != before
    assert Path(hf_hub_download(repo_id, "model.safetensors")).read_bytes() == weights[:10]
    assert Path(hf_hub_download(repo_id, "model.safetensors", revision=before)).read_bytes() == weights
    assert hub_api.model_info(repo_id, files_metadata=True).siblings[-1].lfs.size == 10
    with pytest.raises(KeyError):
        hub_server.corrupt_file(repo_id, "missing.bin", b"")


def test_raw_http_range_chunked_body_and_yaml_errors(hub_server: HubServer, published: Published) -> None:
    connection = http.client.HTTPConnection(hub_server.endpoint.removeprefix("http://"))
    try:
        connection.request(
            "GET", f"/{published.repo_id}/resolve/main/config.json", headers={"Range": "bytes=2-5"}
        )
        response = connection.getresponse()
        assert response.status == 206
        assert response.getheader("Content-Range") == "bytes 2-5/18"
        assert response.read() == b'{"hidden_size": 6}'[2:6]

        connection.request("HEAD", f"/{published.repo_id}/resolve/{published.sha}/model.safetensors")
        response = connection.getresponse()
        response.read()
        weights = (published.folder / "model.safetensors").read_bytes()
        assert response.getheader("X-Repo-Commit") == published.sha
        assert response.getheader("X-Linked-Etag") == f'"{hashlib.sha256(weights).hexdigest()}"'
        assert response.getheader("Content-Length") == str(len(weights))

        body = json.dumps({"content": "---\nlicense: [unclosed\n---\n", "repoType": "model"}).encode()
        connection.request(
            "POST",
            "/api/validate-yaml",
            body=iter([body[:10], body[10:]]),
            encode_chunked=True,
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 400
        assert json.loads(response.read())["errors"][0]["message"].startswith("Invalid YAML")
    finally:
        connection.close()
